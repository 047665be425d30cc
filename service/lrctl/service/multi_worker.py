"""`python -m lrctl.service.multi_worker`: the multi-worker demo trainer of `apps.multi_worker`,
under the name that deployments run."""

from lrctl.service.apps.multi_worker import main

if __name__ == "__main__":
    raise SystemExit(main())
