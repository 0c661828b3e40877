"""
Settings and the device, below every module with a command line (seal.py, sampling.py, domains/, tools/).
A command's settings are one dataclass: its defaults are the values, a field's trailing comment is its
documentation (what --help prints). `--key=value` overrides a default, typed by the default's type; presets of
such overrides live in train.sh.
"""
import ast
import dataclasses
import functools
import inspect
import io
import os
import textwrap
import tokenize

import torch


def parse_overrides(cfg, argv):
    """--key=value over the dataclass defaults, typed by the default's type; unknown keys are an error. --help (or
    -h) prints every setting with its value (the default, or what the other arguments set) and comment, and exits."""
    names = [f.name for f in dataclasses.fields(cfg)]
    for arg in argv:
        if arg in ("--help", "-h"):
            continue
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"expected --key=value, got {arg!r} (--help lists the settings)")
        key, val = arg[2:].split("=", 1)
        if key not in names:
            raise SystemExit(f"unknown setting --{key} (known: {', '.join(names)})")
        typ = type(getattr(cfg, key))
        if typ is bool:
            if val.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--{key} expects true or false, got {val!r}")
            val = val.lower() in ("true", "1")
        else:
            try:
                val = typ(val)
            except ValueError:
                raise SystemExit(f"--{key} expects {typ.__name__}, got {val!r}") from None
        setattr(cfg, key, val)
    if "--help" in argv or "-h" in argv:
        print(settings_help(cfg))
        raise SystemExit(0)
    return cfg


def check_choice(name, value, options):
    """The one check of a setting against its options: stop, naming the setting, the value and the options, unless
    value is one of them (a list setting checks each of its values)."""
    if value not in options:
        raise SystemExit(f"--{name}={value!r}: expected one of {', '.join(map(str, options))}")


def dispatch(argv, commands: dict, doc: str):
    """`python -m MODULE COMMAND [--key=value ...]`: commands[COMMAND](the rest). Without a command (or with
    --help in its place) the module's docstring, which lists its commands; `COMMAND --help` lists its settings."""
    if argv[:1] in (["--help"], ["-h"]):
        print(doc.strip())
        raise SystemExit(0)
    if not argv or argv[0] not in commands:
        raise SystemExit(doc)
    commands[argv[0]](argv[1:])


def field_comments(cls) -> dict:
    """{field name: its trailing comment, continuation lines joined} read from the source of cls and of its
    dataclass bases (a subclass's comment wins; a field it redefines without one keeps its base's)."""
    out = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent("".join(inspect.getsourcelines(klass)[0]))
        except (OSError, TypeError):  # defined where there is no source (an interactive session)
            continue
        lines = src.splitlines()
        comments = {t.start[0]: (t.start[1], t.string.lstrip("#").strip())
                    for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
        alone = lambda n: n in comments and lines[n - 1].lstrip().startswith("#")  # a comment-only line
        for node in ast.parse(src).body[0].body:
            line = node.end_lineno
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)) or line not in comments:
                continue
            col, parts = comments[line][0], [comments[line][1]]
            while alone(line + 1) and comments[line + 1][0] == col:  # aligned below it: it goes on
                line += 1
                parts.append(comments[line][1])
            out[node.target.id] = " ".join(parts)
    return out


def settings_help(cfg) -> str:
    """Every setting of cfg as --key=value with its comment (and its default, where cfg holds another value)."""
    comments = field_comments(type(cfg))
    out = [f"settings ({type(cfg).__name__}), --key=value each:"]
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), f.default
        head = f"  --{f.name}={str(value).lower() if isinstance(value, bool) else value}"
        note = comments.get(f.name, "")
        if default is not dataclasses.MISSING and value != default:
            note = f"(default {default}) {note}".rstrip()
        if len(head) >= 33 and note:  # a long value: the comment goes below it
            out.append(head)
            head = ""
        out.append(textwrap.fill(note, 118, initial_indent=head.ljust(34), subsequent_indent=" " * 34,
                                 break_on_hyphens=False) if note else head)
    return "\n".join(out)


def process_device(gpus: int, env=os.environ) -> str:
    """This process's device: the GPU of its local rank under torchrun (one GPU per process: NCCL, the process
    group's backend on GPUs, cannot share one), the CPU without a GPU. More processes than GPUs exit with the
    reason, before a process meets an invalid device ordinal or NCCL's own error."""
    if gpus == 0:
        return "cpu"
    local_world = int(env.get("LOCAL_WORLD_SIZE", 1))
    if local_world > gpus:
        raise SystemExit(f"--nproc={local_world} processes on a machine with {gpus} GPU(s): each process needs a GPU "
                         f"of its own; use --nproc={gpus} or less")
    return f"cuda:{int(env.get('LOCAL_RANK', 0))}"


def device_and_dtype(cfg):
    """The one place the device and dtype are chosen (cfg.device: auto | cpu | cuda[:i]; cfg.dtype: auto | fp32 |
    bf16): bf16 weights on a GPU (this process's GPU under torchrun), fp32 on a CPU."""
    device = cfg.device
    if device == "auto":
        device = process_device(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    dtypes = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "fp32": torch.float32,
              "bf16": torch.bfloat16}
    dtype = getattr(cfg, "dtype", "auto")
    check_choice("dtype", dtype, dtypes)
    return device, dtypes[dtype]


@functools.cache
def keep_freed_memory():
    """On Linux with glibc, keep freed memory in the process instead of handing it back to the kernel. glibc maps
    each large block (above its mmap threshold) afresh and unmaps it on free, and trims the heap's free top: every
    training step's (T, vocab) logits and large gradients then come back as new pages that the kernel must fault in
    and zero. That cost ~140 ms of a ~1.1 s knowledge-preset step on this CPU (docs/speed.md). Blocks up to 32 MB
    (glibc's ceiling for the threshold) now come from the heap, and the heap is not trimmed. Once per process
    (lora.train calls it)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)     # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: the largest value, never trim in practice
    except (OSError, AttributeError):  # not glibc: nothing to set
        pass
