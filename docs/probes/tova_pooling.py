"""Why per-KV-head TOVA fails on the natural-text passkey where layer-pooled TOVA does not (docs/findings.md).

For every third `kvp_passkey_text` prompt of the anchors check, at budget 0.5: the share of layer x head pairs that
keep each digit of the key's second statement and a whole statement, and what the model answers.
Run from the repository root: `python docs/probes/tova_pooling.py` (about 3 minutes on 2 CPU cores).
"""

from __future__ import annotations

import torch
from kvpolicies_evals.data import text_passkey_samples

import kvpolicies
from kvpolicies import CompressedCache
from kvpolicies.reports.anchors import TASK
from kvpolicies.reports.replication import kept_masks


def main() -> None:
    model, tokenizer = kvpolicies.load_model()
    samples = text_passkey_samples(**TASK.metadata, tokenizer=tokenizer)[::3]
    for name, policy in (("tova (per KV head)", kvpolicies.get_policy("tova")),
                         ("tova, pooling=layer", kvpolicies.get_policy("tova", pooling="layer"))):
        per_digit, whole, exact, truncated = torch.zeros(5), 0.0, 0, 0
        for sample in samples:
            prompt, key = sample["prompt"], sample["answer"]
            encoded = tokenizer(prompt, return_tensors="pt", return_offsets_mapping=True)
            ids, offsets = encoded["input_ids"], encoded["offset_mapping"][0].tolist()
            statements = [prompt.index(key), prompt.rindex(key)]
            tokens = [[next(t for t, (a, b) in enumerate(offsets) if a <= at + d < b) for d in range(5)]
                      for at in statements]
            kept = torch.stack([mask[0] for mask in kept_masks(model, ids, policy, 0.5)])  # layer, head, seq
            per_digit += torch.tensor([float(kept[:, :, t].float().mean()) for t in tokens[1]])
            whole += float((kept[:, :, tokens[0]].all(-1) | kept[:, :, tokens[1]].all(-1)).float().mean())
            output = model.generate(ids, cache=CompressedCache(model, policy, 0.5), max_new_tokens=8,
                                    do_sample=False)
            answer = "".join(c for c in tokenizer.decode(output[0, ids.shape[1]:]).split(".")[0] if c.isdigit())
            exact += answer == key
            truncated += bool(answer) and answer != key and key.startswith(answer)
        n = len(samples)
        print(f"{name}: digits 1-5 kept in " + " ".join(f"{v / n:.2f}" for v in per_digit)
              + f" of layer x head pairs; a whole statement in {whole / n:.2f}; exact answers {exact}/{n}, "
              f"correct but truncated {truncated}/{n}")


if __name__ == "__main__":
    main()
