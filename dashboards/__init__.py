"""The Grafana dashboard for packserve (``packserve.json``), the code that reads its
queries (``queries``) and the command that uploads it (``python -m dashboards.provision``).
"""
