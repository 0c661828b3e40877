"""Scripts that measure or compare the library (bench, gpu_check, compare); nothing in the SEAL loop imports them."""
