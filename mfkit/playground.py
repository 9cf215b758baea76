"""A decoding playground: a prompt, a model, a strategy and sliders; the continuation and the next-token
distribution update as the controls move (ipywidgets). Where nothing can interact (papermill, CI) it renders one
static result with the same code, so an executed notebook still shows an output."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from . import decoding
from .errors import MfkitError

SAMPLING = "sampling (sliders)"
CHOICES = (SAMPLING, "greedy", "beam 4", "greedy + repetition penalty 1.3", "greedy + no repeated 3-grams")


@dataclass(frozen=True)
class Settings:
    """One state of the controls."""

    model: str
    prompt: str
    strategy: str = SAMPLING
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.9
    max_new_tokens: int = 30
    seed: int = 0

    def generate_kwargs(self) -> dict[str, Any]:
        if self.strategy == SAMPLING:
            return decoding.sampling_settings(self.temperature, self.top_k, self.top_p)
        return decoding.strategy(self.strategy)


def render(
    models: Mapping[str, tuple[Any, Any]], settings: Settings, top_n: int = 12
) -> tuple[str, plt.Figure]:
    """The continuation under `settings` and a bar chart of the next-token distribution after the prompt.

    Grey bars: the model's distribution at temperature 1; blue bars: what sampling draws from after temperature,
    top-k and top-p (zero for filtered tokens).
    """
    if settings.model not in models:
        raise MfkitError(f"unknown model {settings.model!r}.", f"choose one of {sorted(models)}.")
    model, tokenizer = models[settings.model]
    new_ids = decoding.generate_batch(
        model,
        tokenizer,
        [settings.prompt],
        settings.max_new_tokens,
        settings.generate_kwargs(),
        seed=settings.seed,
    )[0]
    ids = decoding.encode_left_padded(tokenizer, [settings.prompt])["input_ids"][0]
    plain = decoding.next_token_distribution(model, ids)
    temperature = settings.temperature if settings.strategy == SAMPLING and settings.temperature > 0 else 1.0
    shaped = decoding.next_token_distribution(
        model,
        ids,
        temperature=temperature,
        top_k=settings.top_k if settings.strategy == SAMPLING else 0,
        top_p=settings.top_p if settings.strategy == SAMPLING else 1.0,
    )
    top = torch.maximum(plain, shaped).topk(top_n).indices
    labels = [repr(tokenizer.decode([i])) for i in top.tolist()]
    fig, ax = plt.subplots(figsize=(8, 3))
    x = np.arange(top_n)
    ax.bar(x - 0.2, plain[top].numpy(), width=0.4, color="lightgray", label="model (T=1)")
    ax.bar(x + 0.2, shaped[top].numpy(), width=0.4, color="tab:blue", label="sampled from")
    ax.set_xticks(x, labels, rotation=45, ha="right")
    ax.set(ylabel="probability", title=f"next token after the prompt · {settings.model}")
    ax.legend()
    fig.tight_layout()
    plt.close(fig)
    return tokenizer.decode(new_ids, skip_special_tokens=True), fig


def playground(models: Mapping[str, tuple[Any, Any]], settings: Settings, interactive: bool = True) -> Any:
    """The widget box when `interactive`, else one static rendering of `settings` (displayed)."""
    from IPython.display import display

    if not interactive:
        text, fig = render(models, settings)
        print(f"{settings.prompt}[{text}]")
        display(fig)
        return None
    import ipywidgets as w

    controls = {
        "model": w.Dropdown(options=sorted(models), value=settings.model, description="model"),
        "prompt": w.Textarea(value=settings.prompt, description="prompt", layout=w.Layout(width="95%")),
        "strategy": w.Dropdown(options=CHOICES, value=settings.strategy, description="strategy"),
        "temperature": w.FloatSlider(
            value=settings.temperature, min=0.0, max=2.0, step=0.05, description="temperature"
        ),
        "top_k": w.IntSlider(value=settings.top_k, min=0, max=100, description="top-k (0: off)"),
        "top_p": w.FloatSlider(value=settings.top_p, min=0.05, max=1.0, step=0.05, description="top-p"),
        "max_new_tokens": w.IntSlider(value=settings.max_new_tokens, min=1, max=80, description="new tokens"),
        "seed": w.IntText(value=settings.seed, description="seed"),
    }
    output = w.Output()
    output.add_class("mfkit-playground-output")

    def update(_: Any = None) -> None:
        chosen = Settings(**{name: c.value for name, c in controls.items()})
        for name in ("temperature", "top_k", "top_p"):
            controls[name].disabled = chosen.strategy != SAMPLING
        with output:
            output.clear_output(wait=True)
            try:
                text, fig = render(models, chosen)
            except MfkitError as err:
                print(err)
                return
            print(f"{chosen.prompt}[{text}]")
            display(fig)

    for control in controls.values():
        control.observe(update, names="value")
    update()
    return w.VBox([*controls.values(), output])
