"""The docs teach with real code: their examples run, and their diagrams match the machines."""

from __future__ import annotations

import importlib
import re
import socket
import threading
from pathlib import Path

import pytest

import statemux
from statemux.diagram import to_mermaid

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MACHINE_PAGES = ["echo", "chat", "http", "resp", "syslog"]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def mermaid_blocks(path: Path) -> list[str]:
    return re.findall(r"```mermaid\n(.*?)```", path.read_text(), re.S)


def test_concepts_examples_run() -> None:
    namespace: dict[str, object] = {}
    for block in python_blocks(DOCS / "concepts.md"):
        exec(compile(block, "concepts.md", "exec"), namespace)
    peer = namespace["peer"]
    peer.send(b"olleh\n")  # type: ignore[attr-defined]
    assert peer.received() == b"hello\n"  # type: ignore[attr-defined]
    peer.send(b"bye\n")  # type: ignore[attr-defined]
    assert peer.received() == b"bye ada\n"  # type: ignore[attr-defined]
    assert peer.close_reason is statemux.CloseReason.NORMAL  # type: ignore[attr-defined]


def test_readme_example_serves_a_client() -> None:
    """The README's fifteen lines, with port 0 and a serve_forever that answers one client."""
    (block,) = python_blocks(ROOT / "README.md")
    assert len(block.strip().splitlines()) <= 15
    replies: list[bytes] = []

    class OneShotServer(statemux.MultiplexingTCPServer):
        def serve_forever(self, poll_interval: float | None = 0.5) -> None:
            def client() -> None:
                with socket.create_connection(self.server_address, timeout=5) as sock:
                    sock.sendall(b"quiet please\n")
                    replies.append(sock.recv(100))
                self.shutdown()

            thread = threading.Thread(target=client)
            thread.start()
            super().serve_forever(poll_interval)
            thread.join(5)

    code = block.replace('("127.0.0.1", 7000)', '("127.0.0.1", 0)')
    code = code.replace(
        "from statemux import Frame, Line, Machine, MultiplexingTCPServer, State",
        "from statemux import Frame, Line, Machine, State",
    )
    exec(compile(code, "README.md", "exec"), {"MultiplexingTCPServer": OneShotServer})
    assert replies == [b"QUIET PLEASE\n"]


@pytest.mark.parametrize("name", MACHINE_PAGES)
def test_machine_page_diagrams_are_up_to_date(name: str) -> None:
    """Every Mermaid diagram on a machine's page is exactly what its class generates now.

    Regenerate with ``statemux diagram NAME --format mermaid``.
    """
    page = DOCS / "machines" / f"{name}.md"
    assert page.exists(), f"docs/machines/{name}.md is missing"
    module = importlib.import_module(f"statemachines.{name}")
    machines = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, statemux.Machine)
        and getattr(obj, "spec", None)
        and obj.__module__ == module.__name__
    ]
    generated = {to_mermaid(cls) for cls in machines}
    blocks = mermaid_blocks(page)
    assert blocks, f"docs/machines/{name}.md has no mermaid diagram"
    for block in blocks:
        assert block in generated, (
            f"a diagram in docs/machines/{name}.md is out of date; regenerate it with "
            f"`statemux diagram {name} --format mermaid`"
        )
    # and every machine the module defines is drawn
    assert generated <= set(blocks), (
        f"docs/machines/{name}.md lacks a diagram of one of its machines"
    )
