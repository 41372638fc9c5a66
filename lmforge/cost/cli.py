import typer
from rich.console import Console

from lmforge.cost.hw import cache_path, measure_cpu


def hw_cmd(force: bool = typer.Option(False, "--force", help="Measure again even if a cached value exists.")):
    """Measure this CPU's bf16 and fp32 matmul peak FLOP/s and cache them for MFU.

    Example: lmforge hw --force
    """
    e = measure_cpu(force=force)
    c = Console()
    c.print(f"[bold]{e['name']}[/] ({e['threads']} threads)")
    c.print(f"  fp32 peak: {e['fp32'] / 1e9:8.1f} GFLOP/s")
    c.print(f"  bf16 peak: {e['bf16'] / 1e9:8.1f} GFLOP/s" if e.get("bf16") else "  bf16: not supported")
    c.print(f"  cached in {cache_path()}")
