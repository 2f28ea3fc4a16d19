"""The use cases of the chat, one module each: messages (send, stream, follow, regenerate, stop),
conversations, users, and the process lifecycle (heartbeats, crash recovery, shutdown).

Services write; reads go through `chat.selectors`. Functions here are keyword-only and typed,
and they are what the API views (and tests) call.
"""
