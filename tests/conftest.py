import os

# The Triton kernels run on CPU tensors under the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        import platform

        return platform.processor() or "unknown"


def pytest_sessionstart(session):
    """Print the CPU and the torch build's CPU capability before the tests (also under -q): float32 kernels round
    differently across them, so a failure on one machine kind can be told from one on another."""
    import torch

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"cpu: {_cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
                            f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
