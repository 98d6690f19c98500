"""The learner and how it learns each task: the protocols of
docs/continual.md, "The learner's protocols"."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import resolve_device
from ..networks import MLP, make_network
from ..seeding import derive_seed, generator

__all__ = ["learn", "make_learner", "train"]


def make_learner(config, stream) -> torch.nn.Module:
    """The learner, initialised the same for every method and task: an MLP
    of ``config.hidden`` units or a network of the registry."""
    network = config.spec()["network"]
    seed = derive_seed(config.seed, "learner")
    if network == "mlp":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = MLP(stream.image_shape, stream.num_classes, hidden=config.hidden)
    else:
        net = make_network(network, stream.image_shape, stream.num_classes, seed=seed)
    return net.to(resolve_device(config.device))


def train(net: torch.nn.Module, config, t: int, images, labels, method=None, online: bool = False) -> None:
    """``config.epochs`` epochs of SGD (``config.lr``) on (images (N, C, H,
    W), labels (N,)) in shuffled batches of ``config.batch``. With a
    ``method`` each batch takes ``config.glances`` steps, each joined by
    ``config.replay_batch`` images drawn uniformly from what the method
    recalls (if anything); with ``online`` the method remembers each batch
    after its steps. The batch order is the same for every method; the
    replay draws are each method's own."""
    device = next(net.parameters()).device
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr)
    order_draws = generator(config.seed, "batches", t)
    replay_draws = generator(config.seed, method.name if method else "", "replay", t)
    glances = config.glances if method is not None else 1
    net.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(labels), generator=order_draws)
        for start in range(0, len(labels), config.batch):
            rows = order[start:start + config.batch]
            for _ in range(glances):
                x, y = images[rows], labels[rows]
                replay = method.recalled() if method is not None else None
                if replay is not None:
                    pick = torch.randint(len(replay[1]), (config.replay_batch,), generator=replay_draws)
                    x, y = torch.cat([x, replay[0][pick]]), torch.cat([y, replay[1][pick]])
                loss = F.cross_entropy(net(x.to(device)), y.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if online:
                method.remember(t, images[rows], labels[rows])


def learn(net: torch.nn.Module, method, config, t: int, images, labels) -> torch.nn.Module:
    """Task ``t`` (images (N, C, H, W), labels (N,)) under ``config.protocol``
    (:class:`~addrmem.continual.ContinualConfig`); ``method`` stores it.
    Returns the learner afterwards (a fresh one under "retrain")."""
    if config.protocol == "retrain":
        method.remember(t, images, labels)
        net = make_learner(config, method.stream)
        recalled = method.recalled()  # None for finetune, which keeps nothing: it trains on task t alone
        train(net, config, t, *(recalled if recalled is not None else (images, labels)))
        return net
    online = config.protocol == "online" and method.online
    train(net, config, t, images, labels, method, online=online)
    if not online:
        method.remember(t, images, labels)
    return net
