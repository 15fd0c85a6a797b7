"""What ``guard purify`` reports and writes: before/after figures on the held-out clean images and the
purified weights."""

from __future__ import annotations

import torch

from guard.errors import InputError

STILL_SUCCEEDS = 0.5
"""A purified model on which the reversed triggers (where they were found or pasted anywhere) still turn at
least this share of the held-out images to their label is still suspected, whatever the rescan says or when
it did not run: the repair missed even the trigger it was shown. Repairs that worked leave them at a few
percent, and states that kept the backdoor at most of the images (86.7% on a DemoNet subset in
docs/benchmarks.md, Purification; 95.6% after fine-pruning without its tuning in tests/purify): half sits
well between the two."""


class PurifyResult:
    """Before/after figures of a purification on the held-out clean images, and the purified weights.

    ``ok`` is false when no purified state kept the clean-accuracy drop within the bound; then
    ``state_dict`` is ``None`` and :meth:`save` refuses. ``save`` writes the state_dict atomically.
    """

    def __init__(self, method: str, ok: bool, before: dict, after: dict, state_dict: dict | None, details: dict):
        self.method = method
        self.ok = ok
        self.before = before
        self.after = after
        self.state_dict = state_dict
        self.details = details

    def suspicions(self) -> list[str]:
        """Why the purified model is still suspected of a backdoor, one readable reason each (empty: nothing
        the purification measured says so): the rescan's verdict, and the reversed triggers' success after
        at or over :data:`STILL_SUCCEEDS`. Empty when nothing was kept (``ok`` false: nothing is written)."""
        if not self.ok:
            return []
        a, why = self.after, []
        if a.get("verdict") == "backdoored":
            why.append(f"the rescan suspects label(s) {a.get('suspect_labels') or []}")
        for key, where in (("attack_success", "where they were found"),
                           ("attack_success_anywhere", "pasted anywhere")):
            v = a.get(key)
            if v is not None and v >= STILL_SUCCEEDS:
                why.append(f"the reversed triggers {where} still reach their label on {100 * v:.1f}% of the "
                           f"held-out images")
        return why

    def table(self) -> dict:
        return {"ok": self.ok, "before": self.before, "after": self.after, "details": self.details}

    def format_table(self) -> str:
        def pct(v):
            return "n/a" if v is None or v != v else f"{100 * v:5.1f}%"

        def num(v):
            return "n/a" if v is None else f"{v:.2f}"

        b, a = self.before, self.after
        rows = [("clean accuracy (held out)", pct(b["clean_accuracy"]), pct(a["clean_accuracy"])),
                ("reversed-trigger attack success", pct(b["attack_success"]), pct(a["attack_success"])),
                ("  same, pasted anywhere", pct(b["attack_success_anywhere"]), pct(a["attack_success_anywhere"])),
                ("  after one poisoned re-tuning epoch", pct(b.get("relapse")), pct(a.get("relapse"))),
                ("online rejection of stamped images", pct(b.get("online_rejection")), pct(a.get("online_rejection"))),
                ("online rejection of clean images", pct(b.get("online_false_rejection")),
                 pct(a.get("online_false_rejection"))),
                ("guard scan verdict", self._verdict(b), self._verdict(a)),
                ("anomaly index (max, raw/log)", num(b.get("anomaly_index")) + "/" + num(b.get("log_anomaly_index")),
                 num(a.get("anomaly_index")) + "/" + num(a.get("log_anomaly_index")))]
        w = max(len(r[0]) for r in rows)
        lines = [f"{'':<{w}}  {'before':>22}  {'after':>22}"]
        lines += [f"{r0:<{w}}  {r1:>22}  {r2:>22}" for r0, r1, r2 in rows]
        return "\n".join(lines)

    @staticmethod
    def _verdict(side: dict) -> str:
        v = side.get("verdict")
        if v is None:
            return "not scanned"
        sus = side.get("suspect_labels") or []
        return f"{v} {sus}" if sus else v

    def save(self, path):
        """Write the state_dict with ``torch.save`` via a temporary file renamed into place."""
        import os
        import tempfile
        from pathlib import Path

        if self.state_dict is None:
            raise InputError("the purification kept no state within the accuracy bound; nothing to write")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            torch.save(self.state_dict, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path
