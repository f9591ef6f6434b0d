"""Step 4: the same service as an explicit state machine, in one selectors loop."""

import sys

import attrs

import statemux
from statemux import Frame, Line, Machine, State
from statemux.trace import LoggingTracer


@attrs.define
class Tally(Machine):
    greeting = State(Line(max_length=32), initial=True, timeout=10, doc="waiting for HELLO")
    counting = State(Line(max_length=32), doc="waiting for a number, RESET or BYE")
    done = State(final=True)

    total: int = 0

    @greeting.on(Frame, to=(greeting, counting))
    def hello(self, line: bytes) -> State:
        if line.strip() == b"HELLO":
            self.send(b"welcome\n")
            return self.counting
        self.send(b"ERR say HELLO first\n")
        return self.greeting

    @counting.on(Frame, to=(counting, done))
    def number(self, line: bytes) -> State:
        word = line.strip()
        if word == b"BYE":
            self.send(b"total %d\n" % self.total)
            return self.done
        if word == b"RESET":
            self.total = 0
        elif word.lstrip(b"-").isdigit():
            self.total += int(word)
        else:
            self.send(b"ERR not a number\n")
            return self.counting
        self.send(b"= %d\n" % self.total)
        return self.counting


MODELS = {
    "multiplex": statemux.MultiplexingTCPServer,
    "threading": statemux.ThreadingTCPServer,
    "forking": statemux.ForkingTCPServer,
    "sync": statemux.TCPServer,
}

if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server_class = MODELS[sys.argv[1] if len(sys.argv) > 1 else "multiplex"]
    with server_class(("127.0.0.1", 7100), Tally, tracer=LoggingTracer()) as server:
        server.serve_forever()
