"""A sentence encoder for embedding similarity: any transformers encoder (a local path or a hub id), mean-pooled
over the attention mask (the pooling of sentence-transformers' mean-pooling models)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..errors import ModelError


class MeanPooledEncoder:
    def __init__(self, name_or_path: str, *, trust_remote_code: bool = False, max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            self.model = AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).eval()
        except (OSError, ValueError) as e:
            raise ModelError(f"eval.embedding_model: cannot load encoder {name_or_path!r} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300]}). Give a local directory or a hub id that is "
                             f"cached or reachable.") from None
        self.max_length = max_length

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        dev = next(self.model.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(dev)
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))
