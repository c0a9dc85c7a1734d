"""Model soups: the weights of several models fine-tuned from one initialisation, averaged.

Wortsman et al., "Model soups" (ICML 2022): averaging the weights of models fine-tuned from the
same pretrained weights with different hyperparameters often scores better than the best of them,
at the inference cost of one model. Their greedy soup takes the models best first and keeps each
one only if adding it to the average does not lower the score on held-out images. (Linear heads
trained on one frozen backbone average exactly: averaged weights give averaged logits.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of state dicts of one architecture. Integer tensors (counters such as
    BatchNorm's num_batches_tracked) are taken from the first."""
    first = states[0]
    return {
        key: (
            torch.stack([state[key].float() for state in states]).mean(0).to(value.dtype)
            if value.is_floating_point()
            else value.clone()
        )
        for key, value in first.items()
    }


def compatible(states: list[dict[str, torch.Tensor]]) -> bool:
    """Whether the states share their keys and shapes (one architecture, one head)."""
    first = states[0]
    return all(
        state.keys() == first.keys()
        and all(state[key].shape == value.shape for key, value in first.items())
        for state in states[1:]
    )


def greedy_soup(
    ingredients: list[dict[str, torch.Tensor]], score: Callable[[dict[str, torch.Tensor]], float]
) -> tuple[dict[str, torch.Tensor], list[int], list[float]]:
    """Wortsman et al.'s greedy soup of ``ingredients``, given best first: starting from the first,
    each is kept if the average with it scores at least as well (``score``: higher is better, on
    held-out images) as the soup without it. Returns the soup, the positions of the ingredients it
    holds and the score it had after each ingredient was tried; its score is never below the
    first ingredient's."""
    kept, soup = [0], ingredients[0]
    scores = [score(soup)]
    for position in range(1, len(ingredients)):
        candidate = average([ingredients[i] for i in kept] + [ingredients[position]])
        candidate_score = score(candidate)
        if candidate_score >= scores[-1]:
            kept, soup = kept + [position], candidate
            scores.append(candidate_score)
        else:
            scores.append(scores[-1])
    return soup, kept, scores
