"""SEAL's domains: each module subclasses seal.Domain and drives seal.run. Adding a domain is adding a file."""
