"""The plot of a run (matplotlib, Agg backend): HTTP throughput, p99 latency and server CPU per
request against concurrent connections, one line per server, and the RESP CPU per request of
each server as bars. Written as PNG and SVG.
"""

from __future__ import annotations

from .runner import Row

__all__ = ["plot", "available"]


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _x_label(row: Row) -> str:
    return f"{row.conns}\n+{row.idle:,} idle" if row.idle else str(row.conns)


def plot(rows: list[Row], paths: list[str], title: str = "") -> None:
    """Draw ``rows`` into each of ``paths`` (format from the extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    http = [r for r in rows if r.workload == "http" and r.rps is not None and r.conns]
    # Categories in order of active connections, then idle held.
    cats = sorted({(r.idle, r.conns) for r in http})
    labels = [_x_label(next(r for r in http if (r.idle, r.conns) == c)) for c in cats]
    servers: dict[str, list[Row]] = {}
    for r in http:
        servers.setdefault(r.server, []).append(r)

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    panels = [
        (axes[0][0], "rps", "requests/s", "HTTP keep-alive GET: throughput", False),
        (axes[0][1], "p99_ms", "p99 latency (ms)", "HTTP keep-alive GET: p99 latency", True),
        (axes[1][0], "cpu_us", "server CPU µs / request", "HTTP keep-alive GET: CPU per request", False),
    ]  # fmt: skip
    for ax, attr, ylabel, heading, logy in panels:
        for name, srows in servers.items():
            pts = sorted((cats.index((r.idle, r.conns)), getattr(r, attr)) for r in srows)
            pts = [(x, y) for x, y in pts if y]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xticks(range(len(cats)), labels)
        ax.set_xlabel("concurrent connections")
        ax.set_ylabel(ylabel)
        ax.set_title(heading)
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, alpha=0.3)
    handles, legend_labels = axes[0][0].get_legend_handles_labels()

    ax = axes[1][1]
    resp = [r for r in rows if r.workload.startswith("resp") and r.cpu_us]
    names = list(dict.fromkeys(r.server for r in resp))
    workloads = list(dict.fromkeys(r.workload for r in resp))
    width = 0.8 / max(len(workloads), 1)
    for i, w in enumerate(workloads):
        values = [
            next((r.cpu_us for r in resp if r.server == n and r.workload == w), 0) for n in names
        ]
        ax.bar([j + i * width for j in range(len(names))], values, width, label=w)
    ax.set_xticks([j + width * (len(workloads) - 1) / 2 for j in range(len(names))], names,
                  rotation=20, ha="right", fontsize=8)  # fmt: skip
    ax.set_ylabel("server CPU µs / request")
    ax.set_title("RESP PING/SET/GET: CPU per request")
    ax.grid(True, axis="y", alpha=0.3)
    if workloads:
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    # one legend for the three HTTP panels, below them all, so it hides no point
    if handles:
        fig.legend(handles, legend_labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05 if handles else 0, 1, 1))
    for path in paths:
        fig.savefig(path, dpi=110)
    plt.close(fig)
