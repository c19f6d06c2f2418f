"""Run a module under cProfile, for the benchmarks' "where does the CPU go"
question: ``python bench/profiled.py OUT_PREFIX -m cli.main helper serve ...``.

Writes ``OUT_PREFIX.<pid>.prof`` (pstats format) when the process ends,
also on SIGTERM or SIGINT, and one for each forked child that leaves through
``os._exit`` (`vantage run` measures in a forked process: probes/spool.py).
Bench-only: the product has no profiling hook. cProfile's own overhead
inflates every figure (~2x); read the shares, not the milliseconds. The
timer is the process's CPU time, so a worker thread's CPU lands on whatever
the main thread was running (usually the event loop's poll).
"""

from __future__ import annotations

import cProfile
import os
import runpy
import signal
import sys
import time

_state: dict = {}


def _start() -> None:
    profiler = cProfile.Profile(time.process_time)  # CPU, not wall time: waiting is not cost
    _state["profiler"] = profiler
    profiler.enable()


def _dump() -> None:
    profiler = _state.pop("profiler", None)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(f"{_state['prefix']}.{os.getpid()}.prof")


def _in_child() -> None:
    old = _state.pop("profiler", None)
    if old is not None:
        old.disable()
    _start()


def _profile_threads() -> None:
    """Each thread that ends writes its own profile (``OUT_PREFIX.<pid>.<thread
    name>.prof``): e.g. the store's writer thread."""
    import threading

    run = threading.Thread.run

    def profiled_run(self) -> None:
        profiler = cProfile.Profile(time.thread_time)
        profiler.enable()
        try:
            run(self)
        finally:
            profiler.disable()
            name = "".join(c if c.isalnum() else "-" for c in self.name)
            profiler.dump_stats(f"{_state['prefix']}.{os.getpid()}.{name}.{threading.get_ident()}.prof")

    threading.Thread.run = profiled_run


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        raise SystemExit("usage: profiled.py OUT_PREFIX -m MODULE [ARGS...]")
    _state["prefix"] = sys.argv[1]
    module = sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    real_exit = os._exit

    def exit_dumping(code: int) -> None:
        _dump()
        real_exit(code)

    os._exit = exit_dumping
    os.register_at_fork(after_in_child=_in_child)
    if os.environ.get("PROFILE_THREADS"):
        _profile_threads()
    signal.signal(signal.SIGTERM, _interrupt)
    _start()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        _dump()


if __name__ == "__main__":
    main()
