"""Drop MoELayer into your own model and train it with a plain PyTorch loop (no Lightning needed).

    python examples/moe_layer_in_own_model.py
"""

import torch
from torch import nn

from moe_lightning import GroupedExperts, MoELayer, TopKRouter
from moe_lightning.analytics import summarize_routings


class TinyMoEClassifier(nn.Module):
    """Bag-of-tokens classifier whose hidden block is a Mixture of Experts."""

    def __init__(self, vocab_size: int = 64, dim: int = 64, num_classes: int = 4, num_experts: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.moe = MoELayer(
            TopKRouter(dim, num_experts, num_experts_per_token=2, load_balance_coef=0.01),
            GroupedExperts(num_experts, dim, hidden_dim=128),
        )
        self.head = nn.Linear(dim, num_classes)

    def forward(self, token_ids):
        h = self.embed(token_ids)
        y, routing = self.moe(h)
        return self.head((h + y).mean(dim=1)), routing


def main() -> None:
    torch.manual_seed(0)
    model = TinyMoEClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(200):
        labels = torch.randint(0, 4, (32,))
        token_ids = labels[:, None] * 16 + torch.randint(0, 16, (32, 16))  # class c draws tokens 16c..16c+15
        logits, routing = model(token_ids)
        loss = nn.functional.cross_entropy(logits, labels) + sum(routing.aux_losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == 199:
            layer = summarize_routings([routing])[0]
            print(f"step {step:3d}  loss {loss.item():.3f}  load imbalance max/mean {layer.imbalance:.2f}")


if __name__ == "__main__":
    main()
