"""Step 3: a process per connection. Same handler; nothing is shared between clients."""

import socketserver

from tally_sync import TallyHandler

if __name__ == "__main__":
    socketserver.ForkingTCPServer.allow_reuse_address = True  # restart at once, not after TIME-WAIT
    with socketserver.ForkingTCPServer(("127.0.0.1", 7100), TallyHandler) as server:
        server.serve_forever()
