"""`python -m sweep.sync`: upload the results a sweep spooled while its tracking store was away."""

from __future__ import annotations

import argparse
import sys

from sweep.config import TrackingConfig
from sweep.records.redaction import MASK, redact_uri
from sweep.store.spool import Spool
from sweep.store.sync import upload_spool
from sweep.store.tracking import Tracker
from sweep.views.summary import job_description


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweep.sync",
                                     description="Upload the results a sweep spooled while its store was away.")
    parser.add_argument("--spool", default=TrackingConfig.spool_dir, help="the spool folder (tracking.spool_dir)")
    parser.add_argument("--tracking-uri", help="upload every entry here instead of the store it was meant for "
                        "(needed when that store's URI held credentials, which the spool does not keep)")
    parser.add_argument("--artifact-root", default=TrackingConfig.artifact_root,
                        help="artifact root if the experiment must be created in a local store")
    args = parser.parse_args(argv)
    spool = Spool(args.spool)
    stores = sorted({(Spool.read(p).tracking_uri, Spool.read(p).experiment) for p in spool.pending()})
    if not stores:
        print(f"sweep.sync: nothing to upload in {spool.folder}")
        return 0
    remaining = 0
    for uri, experiment in stores:
        target = args.tracking_uri or uri
        if MASK in target:
            print(f"sweep.sync: entries for {uri} kept: its credentials are not stored; pass --tracking-uri",
                  file=sys.stderr)
            remaining += 1
            continue
        try:
            tracker = Tracker(TrackingConfig(uri=target, experiment=experiment, artifact_root=args.artifact_root),
                              describe=job_description)
        except Exception as error:  # unreachable store: keep everything for the next attempt
            print(f"sweep.sync: {redact_uri(target)}: {error}", file=sys.stderr)
            remaining += 1
            continue
        report = upload_spool(tracker, spool, addressed_to=(uri, experiment))
        print(f"sweep.sync: {report.uploaded} uploaded to {redact_uri(target)} (experiment {experiment!r}), "
              f"{report.left} left")
        for error in report.errors:
            print(f"sweep.sync: {error}", file=sys.stderr)
        remaining += report.left
    return 0 if remaining == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
