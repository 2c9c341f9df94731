"""The HTTP transport: messages as plain ASGI (`messages`), bodies (`multipart`), request heads
bounded in the server's protocol (`limits`), request context (`middleware`), and how requests
reach each protocol's handlers with its errors rendered in its one place (`routing`)."""
