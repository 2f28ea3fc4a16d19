"""Benchmarks of the chat service: ``python -m bench --help`` (``make bench``).

Modules, from the bottom up:

* ``http_client``  the load generator's keep-alive HTTP/1.1 client and SSE parsing
* ``servers``      the fake OpenAI upstream, the database, the service's instances
* ``load``         closed-loop clients, reply checks, CPU and memory sampling (psutil)
* ``reattach``     cross-process re-attach latency of streamed replies
* ``deep_history`` list latency over a large seeded history
* ``report``       statistics, printed reports, JSON
* ``context``      cost of building a conversation's context (in-process, ``bench context``)
* ``__main__``     the command line
"""


class BenchError(Exception):
    """A failure that stops a run (a server did not start, a command failed...)."""
