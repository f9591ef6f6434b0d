"""Step 1: a "deaf" synchronous server. One client at a time; the next one waits.

The protocol: say HELLO, then send numbers (the server answers the running total),
RESET to start again, BYE to hear the total and leave.
"""

import socketserver


class TallyHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        # The connection's state is this function's program counter and locals.
        for line in self.rfile:  # blocks this (only) thread until a line arrives
            if line.strip() == b"HELLO":
                self.wfile.write(b"welcome\n")
                break
            self.wfile.write(b"ERR say HELLO first\n")
        else:
            return
        total = 0
        for line in self.rfile:
            word = line.strip()
            if word == b"BYE":
                self.wfile.write(b"total %d\n" % total)
                return
            if word == b"RESET":
                total = 0
            elif word.lstrip(b"-").isdigit():
                total += int(word)
            else:
                self.wfile.write(b"ERR not a number\n")
                continue
            self.wfile.write(b"= %d\n" % total)


if __name__ == "__main__":
    socketserver.TCPServer.allow_reuse_address = True  # restart at once, not after TIME-WAIT
    with socketserver.TCPServer(("127.0.0.1", 7100), TallyHandler) as server:
        server.serve_forever()
