"""How often a random-weight model's greedy choice sits on a near-tie in bf16: the share of positions whose top two
logits are within one (and four) bf16 spacings of each other, and where bf16 and fp32 weights pick different argmaxes.

``bench_e2e.py``'s synthetic-acceptance runs use random-weight models; their next-token distributions are flat, so
two bf16 computations of the same logits in a different reduction order (another GEMM shape) pick different tokens
far more often than a trained model's would. (The 0.5B-class config of ``bench_e2e.py`` as a proxy for the 7B one.)

    OMP_NUM_THREADS=2 python benchmarks/near_ties.py            # about a minute on 2 CPU cores
"""

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e_models import random_prompts, random_qwen2


def main() -> None:
    torch.manual_seed(0)
    m32 = random_qwen2("0.5b", 152064, torch.float32, torch.device("cpu"))
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    ids = torch.tensor(random_prompts(4, 152064, 64, 64, seed=0))
    with torch.inference_mode():
        l32 = m32(input_ids=ids).logits.float()
        l16 = m16(input_ids=ids).logits.float()
    top2 = l32.topk(2, dim=-1).values
    gap = top2[..., 0] - top2[..., 1]
    ulp = 2.0 ** (torch.floor(torch.log2(top2[..., 0].abs())) - 7)  # bf16 spacing at the top logit
    print(f"positions {gap.numel()}, logit std {float(l32.std()):.3f}, median top-2 gap {float(gap.median()):.4f}")
    print(f"top-2 gap under 1 bf16 spacing: {float((gap < ulp).float().mean()):.1%}, under 4: "
          f"{float((gap < 4 * ulp).float().mean()):.1%}")
    print("argmax differs between bf16 and fp32 weights: "
          f"{float((l16.argmax(-1) != l32.argmax(-1)).float().mean()):.1%}")


if __name__ == "__main__":
    main()
