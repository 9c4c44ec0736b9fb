"""The admission room: the cluster-wide controller deployment (``controller``), its
ledger of leased tokens (``ledger``), the ingress-side client that takes and renews
leases (``leases``) and the Serve request routers that pick a replica (``router``)."""
