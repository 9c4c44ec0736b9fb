"""Upload the dashboard to Grafana, idempotently:

    python -m dashboards.provision --url http://grafana:3000 --api-key KEY [--folder packserve]

The folder is looked up by uid (the folder title, slugged) or by title, and created only
when neither exists; the dashboard is posted with ``overwrite=True`` under its own uid
(``packserve-main``), so a second run updates it in place instead of adding a copy. The
key (a service-account token) is sent as ``Authorization: Bearer``. Uses grafana-client,
the maintained successor of grafana-api.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from dashboards.queries import DASHBOARD, load

DEFAULT_FOLDER = "packserve"


def folder_uid(title: str) -> str:
    """The uid a folder titled ``title`` gets when we create it."""
    return re.sub(r"[^a-z0-9-]+", "-", title.lower()).strip("-")[:40] or "packserve"


def connect(url: str, api_key: str, timeout: float = 10.0):
    """A ``GrafanaApi`` for ``url`` (a path prefix such as ``/grafana`` is kept)."""
    from grafana_client import GrafanaApi

    parts = urlsplit(url)
    path = parts.path.rstrip("/") + "/" if parts.path.strip("/") else ""
    return GrafanaApi.from_url(urlunsplit(parts._replace(path=path)), credential=api_key,
                               timeout=timeout)


def ensure_folder(api, title: str) -> str:
    """The uid of the folder titled ``title`` (or with its uid), created if missing."""
    uid = folder_uid(title)
    folders = api.folder.get_all_folders()
    for folder in folders:  # uid first: a renamed folder is still ours
        if folder.get("uid") == uid:
            return uid
    for folder in folders:
        if folder.get("title") == title:
            return folder["uid"]
    return api.folder.create_folder(title, uid=uid)["uid"]


def provision(url: str, api_key: str, folder: str = DEFAULT_FOLDER,
              dashboard_path: Path = DASHBOARD, timeout: float = 10.0) -> dict:
    """Create the folder if needed and upload the dashboard into it; Grafana's answer
    (``uid``, ``url``, ``version``, ``status``)."""
    dashboard = load(dashboard_path)
    api = connect(url, api_key, timeout)
    uid = ensure_folder(api, folder)
    body = {"dashboard": {**dashboard, "id": None}, "folderUid": uid, "overwrite": True,
            "message": "provisioned by python -m dashboards.provision"}
    return api.dashboard.update_dashboard(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.provision",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="Grafana base URL")
    parser.add_argument("--api-key", required=True, help="service-account token")
    parser.add_argument("--folder", default=DEFAULT_FOLDER, help="folder title")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD, help="dashboard JSON")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    args = parser.parse_args(argv)
    from grafana_client.client import GrafanaException

    try:
        result = provision(args.url, args.api_key, args.folder, args.dashboard, args.timeout)
    except GrafanaException as exc:
        print(f"provisioning failed: Grafana answered {exc.status_code}: {exc.message}",
              file=sys.stderr)
        return 1
    except OSError as exc:  # connection refused, DNS, timeouts
        print(f"provisioning failed: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    print(f"dashboard {result.get('uid')} version {result.get('version')} in folder "
          f"{args.folder!r}: {result.get('url')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
