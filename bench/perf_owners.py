"""Where a process with compiled modules spends its CPU, read from ``perf`` call graphs.

    perf record -F 2999 --call-graph dwarf,16384 -o perf.data -- python -m bench service-path --repeat 3
    perf record -F 1999 --call-graph dwarf,16384 -o perf.data -p <balancer pid> -- sleep 3   (a live run)
    perf script -i perf.data -F ip,sym > perf.txt
    python -m bench perf-owners perf.txt [--within BalancerService___handle] [--top 30]

Each sample is charged to its *owner*: the innermost compiled function on its stack (mypyc's ``CPyDef_…``, its
argument-parsing wrapper ``CPyPy_…`` when Python called it, or one of msgspec's entry points), together with the
CPython API it was calling (dict lookups, allocation, attribute reads). A sample in the interpreter's eval loop is
interpreted Python: its owner is ``(interpreted)``, and a second table names the compiled function that entered the
interpreter (a call into an interpreted module or library). ``--within`` keeps only the samples whose stack holds
that function (the request path, say). Inclusive shares of the compiled functions follow.

cProfile cannot see into compiled modules, and py-spy's native frames misname some of mypyc's static helpers;
perf's DWARF unwinding sees both sides of the boundary (``apt-get install linux-perf``)."""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

#: Innermost frames that own a sample besides mypyc's compiled functions: msgspec's decoder (``json_decode`` and the
#: compiler's clones of it, ``json_decode.part.0``) and struct constructor.
MSGSPEC_ENTRIES = ("json_decode", "JSONDecoder_decode", "Struct_vectorcall", "Encoder_encode")
#: mypyc's compiled functions, and their wrappers that parse the arguments of a call from Python.
COMPILED_PREFIX = "CPyDef_"
WRAPPER_PREFIX = "CPyPy_"
EVAL = "_PyEval_EvalFrameDefault"
INTERPRETED = "(interpreted)"


def stacks(lines: Iterable[str]) -> Iterator[list[str]]:
    """The samples of ``perf script -F ip,sym`` output: each a list of symbols, innermost first."""
    stack: list[str] = []
    for line in lines:
        parts = line.split(None, 1)
        if not parts:
            if stack:
                yield stack
            stack = []
            continue
        symbol = parts[1].strip() if len(parts) > 1 else "?"
        stack.append(symbol.removesuffix(" (inlined)"))
    if stack:
        yield stack


def owner(stack: Sequence[str]) -> tuple[str, str | None]:
    """The sample's owner, and for interpreted code the compiled function that called into it (None if none)."""
    for i, symbol in enumerate(stack):
        if symbol.startswith((COMPILED_PREFIX, WRAPPER_PREFIX)) or symbol.split(".", 1)[0] in MSGSPEC_ENTRIES:
            return symbol, None
        if symbol == EVAL:
            caller = next((s for s in stack[i:] if s.startswith(COMPILED_PREFIX)), None)
            return INTERPRETED, caller
    return stack[0] if stack else "?", None


def report(samples: Iterable[Sequence[str]], within: str | None = None, top: int = 30) -> str:
    owners: Counter[str] = Counter()
    callers: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = kept = 0
    for stack in samples:
        total += 1
        if within is not None and not any(within in symbol for symbol in stack):
            continue
        kept += 1
        name, caller = owner(stack)
        owners[name] += 1
        if name == INTERPRETED:
            callers[caller or "(no compiled caller)"] += 1
        inclusive.update(dict.fromkeys(s for s in stack if s.startswith(COMPILED_PREFIX)).keys())  # (each once)
    if not kept:
        return f"{total} samples, none{f' within {within}' if within else ''}"

    def table(title: str, counts: Counter[str]) -> list[str]:
        return [title, *(f"{n:7d} {100 * n / kept:5.1f} %  {name}" for name, n in counts.most_common(top))]

    head = f"{total} samples, {kept}{f' within {within}' if within else ''} (= 100 %)"
    return "\n".join([head, *table("owner (the innermost compiled function, with the CPython API it calls):", owners),
                      *table("interpreted code, by the compiled function that called it:", callers),
                      *table("compiled functions, inclusive:", inclusive)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench perf-owners", description=__doc__.split("\n\n")[0])
    p.add_argument("script", type=Path, help="output of perf script -F ip,sym (call graphs recorded)")
    p.add_argument("--within", default=None, help="only samples whose stack holds this symbol (a substring)")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    with args.script.open(encoding="utf-8", errors="replace") as lines:
        print(report(stacks(lines), args.within, args.top))
    return 0
