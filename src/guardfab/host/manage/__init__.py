"""The guarded-host agent's management API: VM lifecycle behind role tokens over HTTPS.

The fabric administrator's ``guardfab vm`` commands are clients of this API; the
agent runs the operations in its own process, so the VMs' keys never leave it.

* :mod:`.material` -- the directory: TLS material, role tokens, access table;
* :mod:`.audit` -- the hash-chained log of every mutating request;
* :mod:`.operations` -- the VM operations (provision, start, ...) on this host;
* :mod:`.migrations` -- this agent's halves of live migrations (source and destination);
* :mod:`.api` -- the FastAPI routes, roles and error bodies;
* :mod:`.server` -- uvicorn in a thread of the agent;
* :mod:`.client` -- what the CLI uses;
* :mod:`.orchestrate` -- a live migration driven by the CLI through two agents' APIs.
"""
