"""The training objective as one object: what differs between a causal decoder trained on the next token (clm) and
an encoder trained on masked tokens (mlm), asked of the objective instead of comparing its name in the loop, the
model config, export, import and the planner.

What an objective owns:
  attention      causal or bidirectional (pretrain/model.py's layer spec reads `causal`)
  options        the trainer's flags that only it honours (another objective refuses them, naming the fix), and
                 whether it generates text (--sample-prompt, --eval-tasks' continuations, a generation config)
  data           what it does to each sample before the loss (mlm: pretrain/mlm.py's masking), from the tokenizer
  loss tokens    which tokens the loss and the accuracy count (logged), their share of a step's (the planner), and
                 how the loss is normalised over them (per micro-batch, or over the global batch)
  export         the Hugging Face family its models are written as (None: the decoder family they came from)
  data format    which data_prep formats it trains on (text documents, or conversations with a loss mask) and how
                 its samples are built (megatron's GPTDataset windows, or whole conversations packed)

The name stays the checkpoint's record (meta.json model_config.objective) and the flag's value; ModelConfig keeps
the string and `objective(cfg.objective)` gives the object.
"""
from __future__ import annotations

from typing import Callable


class Objective:
    name: str
    causal: bool
    generates: bool
    loss_tokens: str  # what the loss and the accuracy count, as the log says it
    hf_family: str | None = None  # the family every export is written as; None: the decoder's own
    flags: dict[str, str] = {}  # argparse dest -> what it sets, for flags only this objective honours
    # How the loss is normalised: False, each micro-batch's mean over its loss tokens, averaged over micro-batches
    # and DP ranks (Megatron's rule; exact for clm, where every micro-batch counts the same number of tokens, and
    # kept for mlm, whose masked share varies by a few percent between micro-batches); True, the sum over every
    # loss token of the global batch divided by their number (pretrain.step.global_loss_tokens), for samples that
    # supervise very different numbers of tokens (answer-only fine-tuning), where the mean of means would depend
    # on the micro-batch size, and so on the layout.
    global_loss_tokens: bool = False
    data_formats: tuple[str, ...] = ("text",)  # data_prep --format of the data it trains on
    from_objectives: tuple[str, ...] = ("clm", "mlm", "sft")  # whose weights a new run of it may start from

    def check_data(self, formats: set[str]) -> None:
        """The data must be of this objective's format (conversations need sft, and sft needs conversations)."""
        wrong = sorted(formats - set(self.data_formats))
        if wrong:
            fix = ("pass --objective sft" if set(wrong) <= {"chat", "instruction"} else
                   "prepare the data with `python -m data_prep prepare --format chat|instruction`")
            raise ValueError(f"--data-path holds {'/'.join(wrong)} data, which --objective {self.name} does not train "
                             f"on ({self.name} trains on {'/'.join(self.data_formats)}); {fix}")

    def datasets(self, data_cfg, num_samples: tuple[int, int, int], eod: int):
        """-> (train, valid, test) datasets of this objective's samples."""
        from pretrain.data import build_datasets

        return build_datasets(data_cfg, num_samples)

    def data_transform(self, args, tokenizer, tok_path: str, vocab: int) -> Callable | None:
        """A function that wraps the train/valid/test datasets (None: samples go to the loss as they are)."""
        return None

    def loss_token_share(self, mask_prob: float) -> float:
        """The share of a step's tokens the loss counts (the planner's loss_tokens_per_step)."""
        return 1.0

    def plan_note(self, loss_tokens_per_step: int) -> str | None:
        """A line pretrain.plan prints for this objective, if any."""
        return None

    def check_options(self, args) -> None:
        """Refuse, naming the fix, a flag another objective owns, and text generation when this one has none."""
        for other in OBJECTIVES.values():
            for dest in other.flags:
                if other is not self and dest not in self.flags and getattr(args, dest, None) is not None:
                    raise ValueError(f"--{dest.replace('_', '-')} applies to --objective {other.name} only; this run "
                                     f"trains {self.name} ({self.describe}): drop it, or pass --objective "
                                     f"{other.name}")
        if not self.generates and (getattr(args, "sample_prompt", None) or getattr(args, "eval_tasks", None)):
            flag = "--sample-prompt generates text" if args.sample_prompt else "--eval-tasks scores continuations"
            raise ValueError(f"{flag}, which an {self.name} {self.describe.split()[-1]} does not do; drop it "
                             f"(evaluation reports "
                             f"{self.loss_tokens} loss, accuracy and perplexity)")

    @property
    def describe(self) -> str:
        return "a decoder" if self.causal else "an encoder"


class CausalLM(Objective):
    name, causal, generates, loss_tokens = "clm", True, True, "next-token"


class MaskedLM(Objective):
    """pretrain/mlm.py: BERT-style masking of each sample, seeded by its index; exported as EuroBERT."""
    name, causal, generates, loss_tokens, hf_family = "mlm", False, False, "masked-token", "eurobert"
    flags = {"mask_prob": "prob", "mask_replace_prob": "replace", "mask_random_prob": "random"}

    def data_transform(self, args, tokenizer, tok_path: str, vocab: int) -> Callable:
        from data_prep import tokenizer as tokenizers
        from pretrain import mlm

        mask = tokenizers.mask_id(tokenizer, tok_path)  # ValueError naming the tokenizer when it has none
        config = mlm.MaskingConfig(mask_id=mask, special_ids=tuple(sorted({*tokenizers.special_ids(tokenizer), mask})),
                                   vocab_size=vocab, seed=args.seed,
                                   **{field: getattr(args, dest) for dest, field in self.flags.items()
                                      if getattr(args, dest, None) is not None})
        return lambda datasets: mlm.wrap(datasets, config)

    def loss_token_share(self, mask_prob: float) -> float:
        return mask_prob

    def plan_note(self, loss_tokens_per_step: int) -> str:
        return (f"objective mlm: bidirectional attention and the head over every position cost what clm does; the "
                f"loss counts the masked ~{loss_tokens_per_step:,} tokens of each step")


class SupervisedFineTuning(Objective):
    """Answer-only loss on conversations (data_prep --format chat|instruction; pretrain/sft_data.py): whole
    conversations packed into samples, attention and positions kept within each, the loss over the answer tokens of
    the global batch. A causal decoder like clm (exported as its decoder family, the chat template with it);
    started from a clm or sft model's weights, never an mlm encoder's (they learned bidirectional attention)."""
    name, causal, generates, loss_tokens = "sft", True, True, "answer"
    global_loss_tokens = True
    data_formats = ("chat", "instruction")
    from_objectives = ("clm", "sft")

    def datasets(self, data_cfg, num_samples: tuple[int, int, int], eod: int):
        from pretrain import sft_data

        return sft_data.build_datasets(data_cfg, num_samples, pad_id=eod)

    def check_options(self, args) -> None:
        super().check_options(args)
        if (getattr(args, "pp", 1) or 1) > 1 and getattr(args, "eval_tasks", None):
            # the pipeline's inputs are (tokens, document ids) for every sft batch; lm-eval's requests carry no
            # document ids, and a pipeline fed two structures waits forever (docs/FINDINGS.md)
            raise ValueError("--eval-tasks with --pp > 1 is not supported for --objective sft yet; evaluate the "
                             "export with lm-eval, or drop --pp")

    def loss_token_share(self, mask_prob: float) -> float:
        return 1.0  # the answer share is the data's (its manifest's supervised_tokens / tokens), not the plan's

    def plan_note(self, loss_tokens_per_step: int) -> str:
        return ("objective sft: compute as clm; the loss counts only the answer tokens of each step (the data "
                "manifest's supervised_tokens / tokens of the tokens above), divided over the global batch")


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (CausalLM(), MaskedLM(), SupervisedFineTuning())}


def objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r}: use one of {', '.join(OBJECTIVES)} (clm: a decoder on the next "
                         f"token; mlm: an encoder on masked tokens; sft: a decoder on the answers of conversations)")
    return OBJECTIVES[name]


def for_hf_family(family: str) -> Objective:
    """The objective a Hugging Face model of this family was trained for (EuroBERT: mlm; decoders: clm)."""
    return next((o for o in OBJECTIVES.values() if o.hf_family == family), OBJECTIVES["clm"])
