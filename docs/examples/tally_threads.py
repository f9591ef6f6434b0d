"""Step 2: a thread per connection. Same handler; the blocking read now blocks one thread."""

import socketserver

from tally_sync import TallyHandler

if __name__ == "__main__":
    socketserver.ThreadingTCPServer.allow_reuse_address = True  # restart at once, not after TIME-WAIT
    with socketserver.ThreadingTCPServer(("127.0.0.1", 7100), TallyHandler) as server:
        server.serve_forever()
