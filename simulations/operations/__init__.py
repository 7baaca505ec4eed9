"""The operations room: tooling for the people who run the system, not in the app bundle.

  credentials.py      development TLS certificates and SuperNode keys
  deployment.py       a loopback deployment of real SuperLink and SuperNode processes
  processes.py        its processes: started in groups of their own, stopped by pid
  wire_audit.py       what crosses that deployment's wire: a recording proxy, an HTTP parser, canaries
  local_superlink.py  the SuperLink `flwr run` leaves running, found and stopped by its id
  gpu_kit.py          the kit a lent GPU machine needs (gpu_session.sh runs it there)
"""
