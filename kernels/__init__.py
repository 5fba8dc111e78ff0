"""Fused kernels for fabric-align, each beside its plain-torch reference.

- ``fused_linear_logprob``: lm_head + log-softmax + gather, never materializing N x V logits.
- ``kto_loss`` / ``spin_loss``: masked sequence sums, the loss, its per-token gradient and metrics.

Importable only as ``fabric_align.kernels``.
"""

if __name__ != "fabric_align.kernels":
    # Imported as a top-level ``kernels`` because the checkout's root is on sys.path (``python -m`` run from the
    # repo root). That name belongs to Hugging Face's ``kernels`` package, which transformers probes for by
    # importing it; without a ``__file__`` and ``__version__`` the probe treats this folder as a stray namespace
    # and reports the package as absent, instead of using (or crashing on) our modules.
    __file__ = None  # noqa: A001
else:
    from fabric_align.kernels.logprob import fused_linear_logprob, linear_logprob_reference
    from fabric_align.kernels.losses import kto_loss, kto_loss_reference, spin_loss, spin_loss_reference

    __all__ = [
        "fused_linear_logprob",
        "linear_logprob_reference",
        "kto_loss",
        "kto_loss_reference",
        "spin_loss",
        "spin_loss_reference",
    ]
