"""sketch_core.soup: greedy soups of linear heads fine-tuned from one initialisation on fixed
features (where averaged weights give averaged logits), scored on held-out features."""

import torch
from torch import nn

from sketch_core.soup import average, compatible, greedy_soup

CLASSES, FEATURES = 6, 16


def features(seed: int, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of images of CLASSES classes: a class mean plus noise."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0)) * 1.2
    targets = torch.randint(0, CLASSES, (images,), generator=generator)
    return means[targets] + torch.randn(images, FEATURES, generator=generator), targets


def fine_tuned(start: dict, x, y, *, lr: float, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    head = nn.Linear(FEATURES, CLASSES)
    head.load_state_dict(start)
    optimiser = torch.optim.SGD(head.parameters(), lr=lr)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (32,))
        optimiser.zero_grad()
        nn.functional.cross_entropy(head(x[batch]), y[batch]).backward()
        optimiser.step()
    return {key: value.detach().clone() for key, value in head.state_dict().items()}


def test_a_greedy_soup_never_scores_below_its_best_ingredient_and_leaves_out_what_hurts():
    torch.manual_seed(0)
    start = nn.Linear(FEATURES, CLASSES).state_dict()
    train_x, train_y = features(1, 600)
    held_x, held_y = features(2, 400)

    def accuracy(state: dict) -> float:
        head = nn.Linear(FEATURES, CLASSES)
        head.load_state_dict(state)
        with torch.no_grad():
            return float((head(held_x).argmax(1) == held_y).float().mean())

    good = [
        fine_tuned(start, train_x, train_y, lr=lr, steps=60, seed=s)
        for s, lr in enumerate((0.05, 0.1, 0.2))
    ]
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(3))]
    bad = fine_tuned(start, train_x, shuffled, lr=0.5, steps=200, seed=9)  # learned noise
    ingredients = sorted([*good, bad], key=accuracy, reverse=True)
    assert compatible(ingredients)
    soup, kept, scores = greedy_soup(ingredients, accuracy)
    assert accuracy(soup) == scores[-1] >= accuracy(ingredients[0])
    assert scores == sorted(scores)  # each step keeps the soup or improves it
    assert (
        next(i for i, state in enumerate(ingredients) if state is bad) not in kept
        and len(kept) >= 2
    )
    assert all(torch.equal(soup[key], average([ingredients[i] for i in kept])[key]) for key in soup)


def test_averaging_keeps_counters_and_refuses_other_architectures():
    first, second = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
    second.weight.data.fill_(3.0)
    second.num_batches_tracked.fill_(7)
    averaged = average([first.state_dict(), second.state_dict()])
    assert torch.allclose(averaged["weight"], torch.full((4,), 2.0))
    assert (
        averaged["num_batches_tracked"].dtype == torch.long and averaged["num_batches_tracked"] == 0
    )
    assert not compatible([nn.Linear(4, 3).state_dict(), nn.Linear(4, 5).state_dict()])
