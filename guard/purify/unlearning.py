"""Neural Cleanse unlearning (Wang et al., S&P 2019), a published baseline: fine-tune on clean data
where a share of each batch carries a suspect label's reversed trigger at its true label, so that the
model learns the trigger means nothing.

The reversed trigger is one trigger that works, not the attacker's (docs/design.md): it usually
covers part of the real patch and a few pixels beside it, so each stamp is moved by up to ``jitter``
pixels, which unlearns the neighbourhood the real trigger sits in.
"""

from __future__ import annotations

from torch import nn

from guard.purify.base import Candidates, Purifier
from guard.purify.tuning import finetune_epochs


class NCUnlearning(Purifier):
    """``--method unlearn``: every epoch is offered to the accuracy-bounded selection.

    Parameters
    ----------
    share
        Share of each batch stamped with a reversed trigger (kept at its true label); 0.2.
    epochs, lr, batch_size
        The fine-tuning (Adam, BatchNorm statistics frozen): 10 epochs, lr 1e-3, batches of 32.
    jitter
        Pixels each stamp may move by, each way; 2, since a reversed trigger usually covers part of the
        real patch and a few pixels beside it.
    patience
        Fine-tuning stops after this many epochs in a row over the bound; 4.

    Needs a suspect label. Other keywords go to :class:`~guard.purify.base.Purifier` (``max_drop``,
    ``holdout_share``, ``seed``, ``progress``, ``device``).
    """

    method = "unlearn"
    needs_evidence = True

    def __init__(self, *, share: float = 0.2, epochs: int = 10, lr: float = 1e-3, batch_size: int = 32,
                 jitter: int = 2, patience: int = 4, **kw):
        super().__init__(**kw)
        self.share = share
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.jitter = jitter
        self.patience = patience

    def propose(self, model: nn.Module, c: Candidates) -> None:
        triggers = [t for _, t in c.evidence.triggers(jitter=self.jitter)]
        tuned = finetune_epochs(model, c.x, c.y, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                                seed=self.seed, triggers=triggers, share=self.share, label="unlearn",
                                progress=self.progress)
        c.offer_epochs("unlearn", model, tuned, patience=self.patience)
