"""Small block-diffusion LMs, trained here on CPU, in SGLang's ``SDARForCausalLM`` format.

Nothing small ships a diffusion LM, so this module trains one: a 4-layer, 192-wide Qwen3-style transformer
(transformers' ``Qwen3Model``) with SDAR's block-causal attention (bidirectional inside a block
of ``block_size`` tokens, causal across blocks; the same grid SGLang's dLLM path uses), on
``a+b=`` with ``a``, ``b`` below 1000 (``TrainConfig()``), or on arithmetic progressions whose
answers span five blocks of 16 (``LONG_CONFIG``, ``progression_problem``). The answer's
characters are followed by ``<|im_end|>`` up to the end of its block. Training is masked
diffusion on one block at a time: a random share of the answer tokens of one block is replaced
by the mask token and the model predicts them from the clean context before the block and the
unmasked rest of the block.

Tokens are SmolLM2-135M-Instruct's (its tokenizer splits numbers into digits). SGLang fixes
SDAR's mask id at 151669, so the checkpoint's vocabulary has 151670 rows; only the 14 (15) tokens
the task uses are trained; every other row is zero, which gives those tokens a logit of 0.
Training computes the softmax over the used rows plus one column holding the zero logits of all
the others, which is exactly the full-vocabulary softmax SGLang computes.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SDAR_MASK_ID = 151669  # fixed by SGLang for SDARForCausalLM (sglang/srt/dllm/config.py)
VOCAB_SIZE = SDAR_MASK_ID + 1
EOS_ID = 2  # <|im_end|>
MODEL_DIR_NAME = "sdar-addition"
LONG_MODEL_DIR_NAME = "sdar-progression"


@dataclass(frozen=True)
class TrainConfig:
    block_size: int = 8
    max_operand: int = 999
    hidden_size: int = 192
    layers: int = 4
    heads: int = 4
    steps: int = 4000
    batch_size: int = 128
    learning_rate: float = 2e-3
    seed: int = 0
    threads: int = 2
    task: str = "addition"  # or "progression" (see progression_problem)
    terms: int = 8  # progression: terms of the answer


# Answers of 14 four-digit terms, 13 commas and EOS: 70 tokens over 5 blocks of 16. Blocks of 16
# hold three terms, so a block's first forward must carry d through up to three masked terms;
# with blocks of 8 the model was sure of every position and all schedules sat at their floor.
LONG_CONFIG = TrainConfig(block_size=16, task="progression", terms=14, steps=2400, batch_size=64, learning_rate=2e-3)


def task_characters(config: TrainConfig) -> str:
    return "0123456789+=," if config.task == "progression" else "0123456789+="


def task_tokens(tokenizer, characters: str) -> dict[str, int]:
    """The ids of the characters the task uses; each must be one token."""
    ids = {}
    for ch in characters:
        encoded = tokenizer(ch, add_special_tokens=False)["input_ids"]
        assert len(encoded) == 1, (ch, encoded)
        ids[ch] = encoded[0]
    return ids


def addition_problem(rng: random.Random, max_operand: int) -> tuple[str, str]:
    # operands of 1, 2 and 3 digits equally often, so short problems are not rare
    a, b = (rng.randrange(0, min(10 ** rng.choice([1, 2, 3]), max_operand + 1)) for _ in range(2))
    return f"{a}+{b}=", str(a + b)


def progression_problem(rng: random.Random, terms: int) -> tuple[str, str]:
    """``a+d=`` with a four-digit start ``a`` and a step ``d`` of 1 to 9; the answer is the next
    ``terms`` terms, four digits each (mod 10000), comma-separated. Commas and the leading digits
    mostly repeat the term before (easy); the last digit adds ``d``, and a digit to its left
    changes only when a carry reaches it, which depends on digits still masked in the same block
    (hard). Easy and hard positions share every block."""
    a, d = rng.randrange(10_000), rng.randrange(1, 10)
    return f"{a:04d}+{d}=", ",".join(f"{(a + k * d) % 10_000:04d}" for k in range(1, terms + 1))


def make_problem(rng: random.Random, config: TrainConfig) -> tuple[str, str]:
    if config.task == "progression":
        return progression_problem(rng, config.terms)
    return addition_problem(rng, config.max_operand)


def max_length(config: TrainConfig) -> int:
    """Tokens of the longest example: prompt, answer and EOS up to the end of its block."""
    if config.task == "progression":
        prompt, answer = 7, 5 * config.terms - 1
    else:
        digits = len(str(config.max_operand))
        prompt, answer = 2 * digits + 2, digits + 1
    return math.ceil((prompt + answer + 1) / config.block_size) * config.block_size


def encode_example(prompt: str, answer: str, ids: dict[str, int], block_size: int) -> tuple[list[int], int]:
    """Prompt + answer + EOS up to the end of the answer's last block. Returns (tokens, prompt length)."""
    tokens = [ids[c] for c in prompt] + [ids[c] for c in answer] + [EOS_ID]
    end = math.ceil(len(tokens) / block_size) * block_size
    return tokens + [EOS_ID] * (end - len(tokens)), len(prompt)


def block_causal_mask(length: int, block_size: int) -> torch.Tensor:
    """[length, length] bool: query i sees key j iff j's block is not after i's block."""
    block = torch.arange(length) // block_size
    return block[None, :] <= block[:, None]


class Trainer:
    def __init__(self, config: TrainConfig, tokenizer):
        from transformers import Qwen3Config, Qwen3Model

        self.config = config
        self.ids = task_tokens(tokenizer, task_characters(config))
        # compact vocabulary: the task's characters, EOS and the mask token (14 rows)
        self.used = sorted({*self.ids.values(), EOS_ID, SDAR_MASK_ID})
        self.compact = {tok: i for i, tok in enumerate(self.used)}
        self.model_config = Qwen3Config(
            vocab_size=len(self.used),
            hidden_size=config.hidden_size,
            intermediate_size=config.hidden_size * 3,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            num_key_value_heads=config.heads,
            head_dim=config.hidden_size // config.heads,
            max_position_embeddings=max(64, max_length(config)),
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
        torch.manual_seed(config.seed)
        self.model = Qwen3Model(self.model_config)
        self.rng = random.Random(config.seed)
        self.log_unused = math.log(VOCAB_SIZE - len(self.used))

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] compact ids -> [B, T, U + 1] logits: the used rows, then one column for all zero rows."""
        length = tokens.shape[1]
        mask = block_causal_mask(length, self.config.block_size)[None, None]
        hidden = self.model(input_ids=tokens, attention_mask=mask).last_hidden_state
        used = hidden @ self.model.embed_tokens.weight.T
        rest = torch.full_like(used[..., :1], self.log_unused)
        return torch.cat([used, rest], dim=-1)

    def batch(self):
        """Noised inputs [B, T], targets [B, T] (-100 where no loss) in compact ids."""
        cfg, block = self.config, self.config.block_size
        rows = []
        for _ in range(cfg.batch_size):
            prompt, answer = make_problem(self.rng, cfg)
            tokens, prompt_len = encode_example(prompt, answer, self.ids, block)
            answer_blocks = range(prompt_len // block, len(tokens) // block)
            noised = self.rng.choice(list(answer_blocks))
            start, end = noised * block, (noised + 1) * block
            ratio = self.rng.uniform(0.05, 1.0)
            inputs, targets = list(tokens[:end]), [-100] * end
            positions = [p for p in range(max(start, prompt_len), end)]
            masked = [p for p in positions if self.rng.random() < ratio] or [self.rng.choice(positions)]
            for p in masked:
                inputs[p], targets[p] = SDAR_MASK_ID, self.compact[tokens[p]]
            rows.append(([self.compact[t] for t in inputs], targets))
        width = max(len(r[0]) for r in rows)
        pad = self.compact[EOS_ID]
        inputs = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows])
        targets = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
        return inputs, targets

    def train(self, progress=print) -> None:
        cfg = self.config
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate, weight_decay=0.01)
        warmup = max(1, cfg.steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)),
        )
        self.model.train()
        started = time.monotonic()
        for step in range(cfg.steps):
            inputs, targets = self.batch()
            logits = self.logits(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % 250 == 0 or step == cfg.steps - 1:
                progress(f"step {step}/{cfg.steps}  loss {loss.item():.4f}  {time.monotonic() - started:.0f}s")

    @torch.no_grad()
    def accuracy(self, problems: int = 300, seed: int = 12345) -> float:
        """Greedy one-token-per-step decoding of the held-out problems (the most careful order)."""
        self.model.eval()
        rng, block = random.Random(seed), self.config.block_size
        correct = 0
        for _ in range(problems):
            prompt, answer = make_problem(rng, self.config)
            tokens = [self.compact[self.ids[c]] for c in prompt]
            mask, eos = self.compact[SDAR_MASK_ID], self.compact[EOS_ID]
            while eos not in tokens[len(prompt) :] and len(tokens) < max_length(self.config) + block:
                end = (len(tokens) // block + 1) * block
                canvas = torch.tensor(tokens + [mask] * (end - len(tokens)))[None]
                while (canvas == mask).any():
                    probs = self.logits(canvas)[0, :, :-1].softmax(-1)
                    conf, pred = probs.max(-1)
                    conf[canvas[0] != mask] = -1
                    pos = int(conf.argmax())
                    canvas[0, pos] = pred[pos]
                tokens = canvas[0].tolist()
            digits = tokens[len(prompt) :]
            if eos in digits:
                digits = digits[: digits.index(eos)]
            inverse = {self.compact[v]: k for k, v in self.ids.items()}
            text = "".join(inverse.get(t, "?") for t in digits)
            correct += text == answer
        self.model.train()
        return correct / problems

    def save(self, out_dir: Path, tokenizer, accuracy: float) -> None:
        """Write an SGLang-loadable ``SDARForCausalLM`` folder: the full 151670-row vocabulary."""
        from transformers import Qwen3Config, Qwen3ForCausalLM

        full = Qwen3Config(**{**self.model_config.to_dict(), "vocab_size": VOCAB_SIZE})
        full.eos_token_id = EOS_ID
        full.bos_token_id = None
        full.pad_token_id = EOS_ID
        full.block_size = self.config.block_size
        full.mask_token_id = SDAR_MASK_ID
        # Untied on disk: SGLang 0.5.23's SDAR loader looks up "lm_head.weight" among the
        # parameters, which a tied head does not have (KeyError); the values stay tied.
        full.tie_word_embeddings = False
        model = Qwen3ForCausalLM(full)
        state = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        embed = torch.zeros(VOCAB_SIZE, self.config.hidden_size)
        embed[torch.tensor(self.used)] = state["model.embed_tokens.weight"]
        state["model.embed_tokens.weight"] = embed
        state["lm_head.weight"] = embed.clone()
        model.load_state_dict(state)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        # SGLang picks the model class by architecture: SDAR is Qwen3 weights with block attention
        config_path = out_dir / "config.json"
        saved = json.loads(config_path.read_text())
        saved["architectures"] = ["SDARForCausalLM"]
        config_path.write_text(json.dumps(saved, indent=2) + "\n")
        tokenizer.save_pretrained(out_dir)
        what = (
            f"block-diffusion LM for the next {self.config.terms} terms of a+d, a+2d, ... (mod 10000)"
            if self.config.task == "progression"
            else "block-diffusion LM for a+b (a, b < 1000)"
        )
        card = {
            "what": f"{what}, trained on CPU by sglang-entropy-ccd",
            "train_config": asdict(self.config),
            "held_out_accuracy_one_token_per_step": accuracy,
        }
        (out_dir / "sglang_entropy_model.json").write_text(json.dumps(card, indent=2) + "\n")


def build_model(
    out_dir: Path, config: TrainConfig = TrainConfig(), tokenizer_path=None, progress=print, eval_problems: int = 300
) -> Path:
    """Train the model, measure it on ``eval_problems`` held-out problems and write it to
    ``out_dir`` (replaced). Returns the folder."""
    from transformers import AutoTokenizer

    from sglang_entropy.tools.model import build_default_model, default_model_path

    torch.set_num_threads(config.threads)
    if tokenizer_path is None:
        tokenizer_path = default_model_path()
        if not (tokenizer_path / "config.json").exists():
            build_default_model(progress=progress)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    trainer = Trainer(config, tokenizer)
    trainer.train(progress)
    accuracy = trainer.accuracy(eval_problems)
    progress(f"held-out accuracy (one token per step): {accuracy:.3f}")
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    trainer.save(staging, tokenizer, accuracy)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir


def default_model_dir(config: TrainConfig = TrainConfig()) -> Path:
    from sglang_entropy.tools.model import cache_dir

    name, default_steps = (
        (LONG_MODEL_DIR_NAME, LONG_CONFIG.steps)
        if config.task == "progression"
        else (MODEL_DIR_NAME, TrainConfig.steps)
    )
    # a build with other steps (--steps) goes next to the default one, not over it
    return cache_dir() / (name if config.steps == default_steps else f"{name}-{config.steps}steps")


def ensure_model(config: TrainConfig = TrainConfig(), force: bool = False, progress=print) -> Path:
    """A diffusion model's folder, trained first if it is not there yet (the addition model:
    about 14 min on 2 cores; the progression model: ``LONG_CONFIG``), or retrained when the
    cached one was trained with other settings (an older release's)."""
    out = default_model_dir(config)
    if force or not (out / "config.json").exists() or trained_with(out) != config:
        build_model(out, config, progress=progress)
    return out


def trained_with(model_dir: Path) -> TrainConfig | None:
    """The settings a cached model was trained with (from its card); fields an older card lacks
    take their defaults."""
    card = model_dir / "sglang_entropy_model.json"
    if not card.exists():
        return None
    return TrainConfig(**{**asdict(TrainConfig()), **json.loads(card.read_text())["train_config"]})
