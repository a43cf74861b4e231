"""The rollout: the engine that samples multi-turn trajectories in batches with a hand-written
KV-cache loop. The protocol itself (tags, call grammar, parser, observations) is maestro.py's; the
environment that runs the policy's calls is environment.py's.

The engine. Token layout of one trajectory (Qwen chat template; the glue strings are read from the
processor's own chat template, so a template whose assistant header opens a think block gets that
opener after every observation too):

    prompt      <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{images}{question}<|im_end|>\\n
                <|im_start|>assistant\\n
    turn 1      {sampled text} {call block, maestro.format_call}                          loss mask 1
    observation <|im_end|>\\n<|im_start|>user\\n{information block}<|im_end|>\\n
                <|im_start|>assistant\\n                                                   loss mask 0
    turn 2      ... {call block}                                                          loss mask 1
    observation ...                                                                       loss mask 0
    last turn   ... {answer block}                                                        loss mask 1

A turn ends at the first stop string (maestro.STOP_STRINGS: the closing tags of a call and an
answer) in its decoded text outside its reasoning (stop_reached; stop strings may span or end
inside tokens; the token that completes one is kept, it was sampled), when the policy samples an
end-of-turn token (<|im_end|>, kept with mask 1; the glue then starts after it, so there is never a
second <|im_end|>), or at a budget.
Every sampled id is kept exactly as sampled and nothing is ever re-tokenized: only the glue +
observation string of each call is tokenized, and it is appended to the running sequence and to
the KV cache (only the new tokens are prefilled).

Turn loop: every row samples a turn; answers end the row ('answered'); any other turn, an invalid
one included, is one call (invalid actions get an error observation from the environment). After
`max_turns` calls the policy gets one last turn; if it does not answer the row ends with 'max_turns'
('invalid' when that last turn is not even a valid action). 'budget' when `max_response_tokens`
is reached mid-turn or an observation would not fit (it is never appended partially).

Batching: the unique prompts are prefilled once (vision tower included) and the cache is repeated
for the GRPO group. Rows run in lockstep inside a turn; a row whose turn ended waits with masked
pad tokens (holes, harmless because positions only count real tokens) and a row that is finished is
dropped from the cache at once. Qwen3-VL mRoPE positions are explicit: get_rope_index at prefill,
`cumsum(attention) - 1 + rope_delta` for every later token, so the cached path equals one full
forward over the final sequence. A text-only causal LM runs the same code with 1-D positions.
"""

import functools
import math
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache, StaticCache

from environment import StepResult
from maestro import (END_OF_TURN_TOKENS, KEEP_RAW, PROTOCOLS, SEARCH_OPEN, STOP_STRINGS, THINK_CLOSE, THINK_OPEN,
                     UPSTREAM_GLUE, Action, choice_tokens, parse_action, upstream_action_text,
                     upstream_edit)
from parallel import is_fsdp, unwrap
from policy import build_prompt, observation_glue, suppressed_ids, tokenizer_of, vision_tokens_as_text


@dataclass
class RolloutConfig:
    group_size: int = 8             # samples per prompt (GRPO group)
    max_turns: int | None = None    # expert calls per trajectory, one more turn to answer; None: the registry's max_calls
    max_turn_tokens: int = 512      # sampled tokens per turn
    max_response_tokens: int = 4096  # sampled + observation tokens per trajectory
    temperature: float = 1.0        # divides the logits (also for the log-probs of greedy tokens)
    top_p: float = 1.0              # nucleus sampling; recorded log-probs are of the full distribution
    greedy: bool = False
    protocol: str = "ours"          # 'upstream': the turn loop the released checkpoint was trained with
                                    # (no stop strings, upstream_edit, bare observation turns)
    decode: str = "dynamic"         # KV cache: 'dynamic' grows by concatenation; 'static' is preallocated;
                                    # 'compiled' is static with a torch.compile'd one-token step (CUDA graphs on GPU)
    compact: bool = True            # rows whose turn ended leave the decode steps once they are half the batch;
                                    # a few long observations are fed apart from the short ones


DECODE_MODES = ("dynamic", "static", "compiled")


@dataclass
class Turn:
    text: str                       # decoded sampled tokens of the turn, special tokens included
    action: Action
    result: StepResult | None       # None when the turn made no call (answer, or the trajectory ended)


@dataclass
class Trajectory:
    sample: object                  # data.Sample
    group: int                      # index of the sample in the rollout batch (GRPO group)
    prompt_ids: list
    response_ids: list              # sampled and observation tokens, exactly as conditioned on
    loss_mask: list                 # per response token: 1 sampled, 0 glue/observation
    sample_logprobs: list           # per response token: sampling-time log-prob; 0.0 where mask 0, NaN where a
                                    # trained token was not sampled here (upstream's edits, demonstrations)
    position_ids: torch.Tensor | None  # (3 or 1, P+R) positions used when sampling; None if teacher-forced
    turns: list = field(default_factory=list)
    num_turns: int = 0
    generations: int = 0            # turns generated; more than num_turns when upstream's loop dropped some
    stop_reason: str = ""           # 'answered' | 'max_turns' | 'budget' | 'invalid'
    pixel_values: torch.Tensor | None = None    # the prompt's images as the processor made them (CPU), reused by
    image_grid_thw: torch.Tensor | None = None  # logprobs.collate: the images go through the processor once
    # (response index of a name's choice token, 'expert'|'skill', candidate ids: maestro.choice_tokens)
    choice_positions: list = field(default_factory=list)


def model_device(model):
    return next(unwrap(model).parameters()).device


# ----------------------------------------------------------------------------------------------
# The chat format's tokens the loop needs (computed once per processor)

@dataclass
class _ChatTokens:
    """Glue strings around an observation turn, end-of-turn ids, the stop-string check mask and the
    vision ids that are never sampled."""
    tokenizer: object
    suppressed: torch.Tensor        # (S,) vision special ids, never sampled, -inf in log-probs too
    end_of_turn: set                # ids that end a turn (<|im_end|>, <|endoftext|>)
    may_close: torch.Tensor         # (V,) bool: token text contains the last char of a stop string
    glue_before: str                # closes the assistant turn, opens the user turn
    glue_after: str                 # closes the user turn, opens the next assistant turn
    im_end: int                     # id of <|im_end|>, which ends every turn upstream kept


@functools.lru_cache(maxsize=8)  # one scan of the vocabulary per processor, not per rollout or demo
def _chat_tokens(processor, vocab_size, device):
    tokenizer = tokenizer_of(processor)
    closers = {stop[-1] for stop in STOP_STRINGS}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    may_close = [any(c in (p or "") for c in closers) for p in pieces][:vocab_size]
    may_close += [False] * (vocab_size - len(may_close))
    end_of_turn = {tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS} - {None, tokenizer.unk_token_id}
    before, after = observation_glue(processor)
    return _ChatTokens(tokenizer, torch.tensor(suppressed_ids(processor), dtype=torch.long, device=device),
                       end_of_turn, torch.tensor(may_close, dtype=torch.bool, device=device), before, after,
                       tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKENS[0]))


def observation_ids(chat, observation, turn_ids, protocol="ours"):
    """Token ids of glue + observation + glue after a turn; no second end-of-turn token when the
    turn already ended with one. Upstream's glue is a bare user turn after the turn's <|im_end|>,
    and the policy goes on right after it (no assistant header)."""
    if protocol == "upstream":
        observation = vision_tokens_as_text(observation)
        return chat.tokenizer(UPSTREAM_GLUE[0] + observation + UPSTREAM_GLUE[1], add_special_tokens=False)["input_ids"]
    before = chat.glue_before
    if turn_ids and turn_ids[-1] in chat.end_of_turn:
        sampled_end = chat.tokenizer.convert_ids_to_tokens(turn_ids[-1])
        if before.startswith(sampled_end):
            before = before[len(sampled_end):]
    return chat.tokenizer(before + observation + chat.glue_after, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------
# Per-row bookkeeping shared by the sampled rollout and teacher-forced trajectories

@dataclass
class _Row:
    traj: Trajectory
    registry: object = None       # what the prompt listed: the names its routing choices are told apart from
    prompt_positions: torch.Tensor | None = None  # (3 or 1, P)
    positions: list = field(default_factory=list)  # text position of each response token fed so far
    pending: list = field(default_factory=list)    # sequence tokens not yet in the KV cache
    turn_ids: list = field(default_factory=list)   # sampled tokens of the current turn
    turn_end: str = ""   # '' while sampling, else 'stop' | 'end_of_turn' | 'turn_budget' | 'budget' | 'given'
    turn_start: int = 0           # len(response_ids) when the current turn began
    rewound: bool = False         # the turn's tokens left the trajectory: their cache columns must be masked
    discarded: bool = False       # the turn was dropped whole: sample the next one from the same context
    start_logits: torch.Tensor | None = None  # (V,) next-token logits when the current turn began

    def rewind(self):
        """Take the current turn's tokens out of the trajectory (upstream edits or drops turns)."""
        traj, keep = self.traj, self.turn_start
        del traj.response_ids[keep:], traj.loss_mask[keep:], traj.sample_logprobs[keep:], self.positions[keep:]
        self.pending, self.turn_ids, self.rewound = [], [], True

    def append(self, ids, sampled, logprobs=None):
        traj = self.traj
        traj.response_ids += ids
        traj.loss_mask += [int(sampled)] * len(ids)
        traj.sample_logprobs += logprobs if logprobs is not None else [math.nan if sampled else 0.0] * len(ids)
        self.pending += ids
        if sampled:
            self.turn_ids += ids


def apply_upstream_edit(row, chat):
    """Replace the turn just sampled by what upstream kept of it (re-encoded, ending with <|im_end|>,
    loss mask 1, sampling log-prob 0: it was not sampled in this context), or drop it. Returns False
    when the turn was dropped."""
    tokenizer = chat.tokenizer
    kept = upstream_edit(tokenizer.decode(row.turn_ids, skip_special_tokens=True), row.traj.generations - 1, tokenizer)
    if kept is None:
        row.rewind()
        return False
    if kept is not KEEP_RAW:
        ids = tokenizer(vision_tokens_as_text(kept), add_special_tokens=False)["input_ids"] + [chat.im_end]
        # unchanged: keep the sampled tokens and their log-probs; longer: upstream kept the raw generation
        if ids != row.turn_ids and len(ids) <= len(row.turn_ids):
            row.rewind()
            row.append(ids, sampled=True)
    return True


def stop_reached(chat, turn_ids, window):
    """Whether the turn's last token completed a stop string outside the turn's reasoning: a
    </search> or </answer> written inside <think> (rehearsing the call format) does not end it."""
    if not any(s in chat.tokenizer.decode(turn_ids[-window:]) for s in STOP_STRINGS):
        return False
    text = chat.tokenizer.decode(turn_ids)
    if THINK_CLOSE in text:
        text = text[text.rindex(THINK_CLOSE):]
    elif THINK_OPEN in text or THINK_OPEN in chat.glue_after:  # (a thinking template opens every turn)
        return False
    return any(s in text.partition(THINK_OPEN)[0] for s in STOP_STRINGS)  # (a second reasoning block)


def close_turn(row, chat, cfg):
    """Parse the turn just sampled (under cfg.protocol 'upstream', what upstream_edit kept of it),
    record it and its choice positions, and end the trajectory if this turn answered, ran out of
    budget or was the last one allowed."""
    traj, tokenizer = row.traj, chat.tokenizer
    traj.generations += 1
    if cfg.protocol == "upstream" and not apply_upstream_edit(row, chat):
        row.discarded = True
        if traj.generations > cfg.max_turns:
            traj.stop_reason = "max_turns"
        return
    text = tokenizer.decode(row.turn_ids)
    if cfg.protocol == "upstream":
        acted = upstream_action_text(text)
    elif row.turn_end == "stop":  # the token that completed a stop string may carry more (a merged '>.')
        acted = text[:max(text.rfind(s) + len(s) for s in STOP_STRINGS if s in text)]
    else:
        acted = text
    # a thinking template opened the reasoning in the prompt: a turn that never closes it has no action
    opened = THINK_OPEN if cfg.protocol == "ours" and THINK_OPEN in chat.glue_after else ""
    action = parse_action(opened + acted)
    traj.turns.append(Turn(text, action, None))
    if action.kind == "search":  # (a call's names lie where acted and text agree)
        start = len(traj.response_ids) - len(row.turn_ids)
        names = {"expert": [e.name for e in row.registry.advertised_experts()],
                 "skill": [s.name for s in row.registry.advertised_skills()]}
        for position, kind, candidates in choice_tokens(tokenizer, acted, row.turn_ids, action, names):
            traj.choice_positions.append((start + position, kind, candidates))
    if action.kind == "answer":
        traj.stop_reason = "answered"
    elif row.turn_end == "budget" or (cfg.protocol == "upstream" and len(traj.response_ids) >= cfg.max_response_tokens):
        traj.stop_reason = "budget"  # upstream: the budget is checked on what its edit kept
    elif traj.generations > cfg.max_turns:
        traj.stop_reason = "invalid" if action.kind == "invalid" else "max_turns"
    elif cfg.protocol == "upstream" and SEARCH_OPEN not in acted:
        traj.stop_reason = "invalid"  # upstream ended a trajectory whose kept turn made no call; a
        # malformed one it answered with an error and went on, as execute_turn does here


def execute_turn(rows, env, chat, cfg, results=None):
    """Run the calls of every row still going (concurrently, one env.step) and append the
    observations, unless one would not fit in the response budget. A dropped turn has no call.
    results: the calls' StepResults when they were already run (a demonstration's)."""
    waiting = [row for row in rows if not row.traj.stop_reason and not row.discarded]
    if results is None:
        results = env.step([row.traj.turns[-1].action for row in waiting], [row.traj.sample for row in waiting]) if waiting else []
    for row, result in zip(waiting, results):
        row.traj.turns[-1].result = result
        ids = observation_ids(chat, result.observation, row.turn_ids, cfg.protocol)
        if len(row.traj.response_ids) + len(ids) >= cfg.max_response_tokens:
            row.traj.stop_reason = "budget"
        else:
            row.append(ids, sampled=False)
    for row in rows:
        row.turn_ids, row.turn_end = [], ""


def finish(row):
    traj = row.traj
    traj.num_turns = len(traj.turns)
    if row.prompt_positions is not None:
        positions = list(row.positions)
        last = positions[-1] if positions else int(row.prompt_positions[0, -1])
        while len(positions) < len(traj.response_ids):  # the last sampled token is never fed
            last += 1
            positions.append(last)
        response = torch.tensor(positions, dtype=torch.long).expand(row.prompt_positions.shape[0], -1)
        traj.position_ids = torch.cat([row.prompt_positions, response], dim=1)
    return traj


# ----------------------------------------------------------------------------------------------
# The cached batch

def rope_positions(model, input_ids, attention_mask, image_grid_thw=None):
    """Positions of a full (padded) sequence: (3, B, L) mRoPE for Qwen3-VL, (B, L) for a text LM.
    Returns (positions, deltas (B, 1)) where deltas turn `cumsum(mask) - 1` into later positions."""
    core = unwrap(model)
    if hasattr(core.config, "vision_config"):
        image_tokens = (input_ids == core.config.image_token_id).int()
        return core.model.get_rope_index(input_ids, image_tokens, image_grid_thw=image_grid_thw,
                                         attention_mask=attention_mask)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return positions, torch.zeros_like(positions[:, :1])


def select_rows(cache, index):
    """Keep (and repeat) cache rows: index (A',) of row numbers, in order. Works on dynamic and
    static layers alike."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
    pin_static(cache)


def pin_static(cache):
    """After a static cache's tensors were replaced: its batch size, and a fixed address again for
    each tensor (CUDA graphs replay on fixed addresses). Nothing to do for a dynamic cache."""
    if isinstance(cache, StaticCache):
        for layer in cache.layers:
            if layer.is_initialized:
                layer.batch_size = layer.keys.shape[0]
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)


_compiled = [None, None]  # [the last model compiled, its compiled forward]: one kept, not one per model


def compiled_forward(model):
    """The model's forward under torch.compile, for one-token steps on a static cache. Parameters
    are graph inputs, so optimizer updates between rollouts need no recompile; on CUDA,
    'reduce-overhead' replays the step as a CUDA graph."""
    core = unwrap(model)
    if is_fsdp(core):
        raise ValueError("decode='compiled' is not supported under FSDP (its unshard hooks run inside the "
                         "forward); use decode='static' or 'dynamic', or train with DDP")
    if _compiled[0] is not core:
        mode = "reduce-overhead" if model_device(core).type == "cuda" else None
        _compiled[:] = [core, torch.compile(core, mode=mode)]
    return _compiled[1]


@dataclass
class _Batch:
    """The rows in the KV cache, in lockstep. Column t of `attention` is cache slot t."""
    rows: list
    cache: DynamicCache | StaticCache
    attention: torch.Tensor   # (A, T) 1 on real tokens, 0 on pads and holes
    deltas: torch.Tensor      # (A, 1) mRoPE offset of text positions (0 for a text LM)
    logits: torch.Tensor      # (A, V) next-token logits of each row
    step: object = None       # what runs a one-token step (the model, or its compiled forward)
    aside: list = field(default_factory=list)  # rows out of the decode steps until rejoin: (rows, [(keys, values)
                                               # per layer], attention, deltas, logits)
    order: list = field(default_factory=list)  # the rows before the first was set aside

    def keep(self, keep):
        """Drop rows from the cache and the state (keep: list of bools, one per row)."""
        self.take([i for i, k in enumerate(keep) if k])

    def take(self, index):
        """Keep the rows at `index` (list of row numbers), in that order, in the cache and the state."""
        if index == list(range(len(self.rows))):
            return
        rows = torch.tensor(index, dtype=torch.long, device=self.attention.device)
        select_rows(self.cache, rows)
        self.attention, self.deltas, self.logits = self.attention[rows], self.deltas[rows], self.logits[rows]
        self.rows = [self.rows[i] for i in index]

    def set_aside(self, waiting):
        """Take the rows marked in `waiting` (list of bools) out of the decode steps: their cache rows,
        mask, offsets and logits are copied aside until `rejoin`. One copy of the cache, as one
        dynamic-cache step makes anyway, against a step's compute for each waiting row per step."""
        if not self.aside:
            self.order = list(self.rows)
        index = torch.tensor([i for i, w in enumerate(waiting) if w], dtype=torch.long, device=self.attention.device)
        layers = [(layer.keys[index], layer.values[index]) for layer in self.cache.layers if layer.is_initialized]
        self.aside.append(([row for row, w in zip(self.rows, waiting) if w], layers,
                           self.attention[index], self.deltas[index], self.logits[index]))
        self.keep([not w for w in waiting])

    def rejoin(self):
        """Put the rows set aside back in their places; the columns they missed are masked holes
        (positions count real tokens, so a row continues where it stopped). The row order, hence
        the sampler's draws, is as if no row had been set aside."""
        if not self.aside:
            return
        pad = torch.nn.functional.pad
        for rows, layers, attention, deltas, logits in self.aside:
            for layer, (keys, values) in zip(self.cache.layers, layers):
                missed = (0, 0, 0, layer.keys.shape[2] - keys.shape[2])
                layer.keys = torch.cat([layer.keys, pad(keys, missed)])
                layer.values = torch.cat([layer.values, pad(values, missed)])
            self.attention = torch.cat([self.attention, pad(attention, (0, self.attention.shape[1] - attention.shape[1]))])
            self.deltas, self.logits = torch.cat([self.deltas, deltas]), torch.cat([self.logits, logits])
            self.rows += rows
        pin_static(self.cache)
        rank = {id(row): k for k, row in enumerate(self.order)}
        self.take(sorted(range(len(self.rows)), key=lambda i: rank[id(self.rows[i])]))
        self.aside, self.order = [], []


def prefill(model, encoded, max_cache_len=None):
    """One forward over left-padded prompts.

    encoded: list of dicts with "input_ids" (1, P_i) and, for Qwen3-VL, "pixel_values" /
    "image_grid_thw" of that prompt. max_cache_len: None for a dynamic cache, else the slots of a
    static one. Returns (cache, attention (N, P), deltas (N, 1), logits (N, V), positions (3 or 1, N, P)).
    """
    device = model_device(model)
    lengths = [e["input_ids"].shape[1] for e in encoded]
    width = max(lengths)
    pad = unwrap(model).config.get_text_config().pad_token_id or 0
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        input_ids[i, width - lengths[i]:] = e["input_ids"][0]
        attention[i, width - lengths[i]:] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    images = [e for e in encoded if e.get("pixel_values") is not None]
    extra = {}
    if images:
        extra = {"pixel_values": torch.cat([e["pixel_values"] for e in images]).to(device),
                 "image_grid_thw": torch.cat([e["image_grid_thw"] for e in images]).to(device)}
    positions, deltas = rope_positions(model, input_ids, attention, extra.get("image_grid_thw"))
    text_config = unwrap(model).config.get_text_config()
    if max_cache_len is None:
        cache, mask = DynamicCache(config=text_config), attention
    else:
        cache = StaticCache(config=text_config, max_cache_len=max_cache_len)
        mask = padded_mask(attention, cache)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=1, **extra)
    return cache, attention, deltas, out.logits[:, -1], positions if positions.dim() == 3 else positions[None]


def padded_mask(attention, cache):
    """(A, T) attention -> (A, slots) for a static cache, which attends over all its slots (empty ones
    masked). It doubles when T would not fit (one copy; a compiled step then recompiles once), so its
    first size can be one turn's worth instead of a bound on the whole trajectory."""
    slots = cache.get_max_length()
    if attention.shape[1] > slots:
        slots = max(attention.shape[1], 2 * slots)
        for layer in cache.layers:
            layer.max_cache_len = slots
            if layer.is_initialized:
                grow = (0, 0, 0, slots - layer.keys.shape[2])
                layer.keys = torch.nn.functional.pad(layer.keys, grow)
                layer.values = torch.nn.functional.pad(layer.values, grow)
        pin_static(cache)
    return torch.nn.functional.pad(attention, (0, slots - attention.shape[1]))


def feed(model, batch, chunks):
    """Append one chunk of tokens per row (right-aligned, left pads masked) to the cache and keep
    the logits after each row's last token. Rows with an empty chunk only get masked pads."""
    rows, width = batch.rows, max(len(c) for c in chunks)
    device = batch.attention.device
    pad = unwrap(model).config.get_text_config().pad_token_id or 0
    new_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    new_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, chunk in enumerate(chunks):
        if chunk:
            new_ids[i, width - len(chunk):] = torch.tensor(chunk)
            new_mask[i, width - len(chunk):] = 1
    batch.attention = torch.cat([batch.attention, new_mask.to(device)], dim=1)
    positions = (batch.attention.cumsum(-1) - 1).clamp(min=0)[:, -width:] + batch.deltas
    mrope = hasattr(unwrap(model).config, "vision_config")
    static = isinstance(batch.cache, StaticCache)
    compiled = width == 1 and batch.step is not None
    if compiled:  # a CUDA graph's outputs are overwritten by its next replay: logits are cloned below
        torch.compiler.cudagraph_mark_step_begin()
    out = (batch.step if compiled else model)(
        input_ids=new_ids.to(device), attention_mask=padded_mask(batch.attention, batch.cache) if static else batch.attention,
        position_ids=positions.expand(3, -1, -1) if mrope else positions, cache=batch.cache, use_cache=True,
        logits_to_keep=1)
    batch.logits = out.logits[:, -1].clone() if compiled else out.logits[:, -1]
    for row, chunk, row_positions in zip(rows, chunks, positions.tolist()):
        row.positions += row_positions[width - len(chunk):]
        row.pending = []


def continue_after_observations(model, batch, compact=False):
    """Between turns: prefill only the new tokens (last sampled token + glue + observation). With
    `compact`, a few long chunks (say, error messages) do not widen every row's feed: all rows feed
    up to the width that costs least (split_width), then the longer rows feed their rest alone."""
    chunks = [row.pending for row in batch.rows]
    if not any(chunks):  # every row may have dropped its turn (upstream)
        return
    width = split_width([len(chunk) for chunk in chunks]) if compact else max(map(len, chunks))
    rests = [chunk[width:] for chunk in chunks]
    feed(model, batch, [chunk[:width] for chunk in chunks])
    if any(rests):
        batch.set_aside([not rest for rest in rests])
        feed(model, batch, [rest for rest in rests if rest])
        batch.rejoin()


def split_width(lengths):
    """The width w of a first feed of every row (chunks cut at w) that, followed by a feed of the
    rows longer than w, costs the fewest token columns: len(lengths) x w + (rows longer) x
    (longest - w). A split must save a quarter of one feed at the longest width (it also copies
    the cache twice)."""
    longest, rows = max(lengths), len(lengths)
    cost = {w: rows * w + sum(n > w for n in lengths) * (longest - w) for w in set(lengths) if w > 0}
    best = min(cost, key=cost.get)
    return best if cost[best] <= 0.75 * rows * longest else longest


def sample_tokens(logits, suppressed, cfg):
    """(A, V) logits -> sampled tokens (A,) and their log-probs (A,) under the temperature-scaled
    distribution with the vision tokens removed (the distribution compute_logprobs recomputes)."""
    logits = logits.float().index_fill(1, suppressed, float("-inf"))
    logprobs = torch.log_softmax(logits / cfg.temperature, dim=-1)
    if cfg.greedy:
        tokens = logprobs.argmax(-1)
    else:
        probs = logprobs.exp()
        if cfg.top_p < 1.0:
            sorted_probs, order = probs.sort(-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= cfg.top_p  # mass before it already >= top_p
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        tokens = torch.multinomial(probs, 1).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def generate_turn(model, batch, chat, cfg):
    """Sample one turn for every row of the batch, in lockstep, until every row's turn has ended.
    Finished trajectories leave the cache immediately; rows whose turn ended wait aside once they are
    half the batch (cfg.compact), so a few long turns do not drag the rest. Upstream's protocol has no stop strings and
    no mid-turn response budget (its edit decides what stays); a turn it edits or drops leaves the
    cache as masked columns (holes: positions count real tokens only), and what it kept is fed anew."""
    stops = STOP_STRINGS if cfg.protocol == "ours" else ()
    window = max(map(len, STOP_STRINGS)) + 1  # tokens: enough to hold any stop string
    turn_start = batch.attention.shape[1]  # cache column of the turn's first token
    for i, row in enumerate(batch.rows):
        row.turn_start, row.start_logits = len(row.traj.response_ids), batch.logits[i]
    while True:
        sampling = [i for i, row in enumerate(batch.rows) if not row.turn_end]
        index = torch.tensor(sampling, dtype=torch.long, device=batch.logits.device)
        tokens, logprobs = sample_tokens(batch.logits[index], chat.suppressed, cfg)
        may_close = chat.may_close[tokens]
        for i, token, logprob, check in zip(sampling, tokens.tolist(), logprobs.tolist(), may_close.tolist()):
            row = batch.rows[i]
            row.append([token], sampled=True, logprobs=[logprob])
            if token in chat.end_of_turn:
                row.turn_end = "end_of_turn"
            elif check and stops and stop_reached(chat, row.turn_ids, window):
                row.turn_end = "stop"
            elif stops and len(row.traj.response_ids) >= cfg.max_response_tokens:
                row.turn_end = "budget"
            elif len(row.turn_ids) >= cfg.max_turn_tokens:
                row.turn_end = "turn_budget"
            if row.turn_end:
                close_turn(row, chat, cfg)
                if row.rewound:
                    batch.attention[i, turn_start:] = 0
                    row.rewound = False
        batch.keep([not row.traj.stop_reason for row in batch.rows])
        waiting = [bool(row.turn_end) for row in batch.rows]
        if all(waiting):
            batch.rejoin()
            return
        if cfg.compact and 2 * sum(waiting) >= len(waiting):  # their last token is fed with the observation
            batch.set_aside(waiting)
        feed(model, batch, [row.pending for row in batch.rows])


@torch.no_grad()
def rollout(model, processor, samples, env, cfg):
    """Sample cfg.group_size trajectories per sample. Returns len(samples) * group_size
    Trajectories, grouped: rows [i * group_size, (i + 1) * group_size) belong to samples[i].

    `model` is the module to call (it may be a DDP wrapper); helpers are reached on the unwrapped
    module. The caller handles autocast, eval mode and FSDP unsharding.
    """
    if cfg.temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {cfg.temperature}); use greedy=True for greedy decoding")
    if cfg.protocol not in PROTOCOLS or env.protocol != cfg.protocol:
        raise ValueError(f"rollout protocol {cfg.protocol!r} with an environment of protocol {env.protocol!r}: "
                         f"expected the same one of {PROTOCOLS}")
    cfg = replace(cfg, max_turns=env.max_calls if cfg.max_turns is None else cfg.max_turns)
    chat = _chat_tokens(processor, unwrap(model).config.get_text_config().vocab_size, model_device(model))
    prompts = [build_prompt(processor, env.registry_of(sample), sample, cfg.protocol) for sample in samples]
    if cfg.decode not in DECODE_MODES:
        raise ValueError(f"RolloutConfig.decode: expected one of {DECODE_MODES}, got {cfg.decode!r}")
    slots = None
    if cfg.decode != "dynamic":  # room for the first turn and its observation; the cache doubles when full
        slots = max(p["input_ids"].shape[1] for p in prompts) + cfg.max_turn_tokens + env.obs_token_budget + 64
    cache, attention, deltas, logits, positions = prefill(model, prompts, max_cache_len=slots)
    groups = torch.arange(len(samples), device=attention.device).repeat_interleave(cfg.group_size)
    select_rows(cache, groups)  # each unique prompt was prefilled once
    rows = []
    for i, (sample, prompt) in enumerate(zip(samples, prompts)):
        real = attention[i].bool()
        for _ in range(cfg.group_size):
            traj = Trajectory(sample=sample, group=i, prompt_ids=prompt["input_ids"][0].tolist(), response_ids=[],
                              loss_mask=[], sample_logprobs=[], position_ids=None,
                              pixel_values=prompt.get("pixel_values"), image_grid_thw=prompt.get("image_grid_thw"))
            rows.append(_Row(traj, env.registry_of(sample), prompt_positions=positions[:, i, real].cpu()))
    step = compiled_forward(model) if cfg.decode == "compiled" else None
    batch = _Batch(list(rows), cache, attention[groups], deltas[groups], logits[groups], step)
    while batch.rows:
        generate_turn(model, batch, chat, cfg)
        execute_turn(batch.rows, env, chat, cfg)
        batch.keep([not row.traj.stop_reason for row in batch.rows])
        if batch.rows:
            continue_after_observations(model, batch, cfg.compact)
        for i, row in enumerate(batch.rows):  # a dropped turn is sampled again from the same context
            if row.discarded:
                batch.logits[i], row.discarded = row.start_logits, False
    return [finish(row) for row in rows]


def trajectory_from_texts(processor, sample, env, turn_texts, results=None, max_turns=None):
    """A teacher-forced trajectory: the given assistant turn texts are tokenized (instead of
    sampled) and laid out exactly like a rollout under env.protocol (same glue and edits,
    observations from env.step, or from `results`, the calls' StepResults in turn order when they
    were already run, one per call made; loss mask 1 on the turn tokens). Used for SFT
    demonstrations; log-probs are 0 and position_ids None. max_turns None: the registry's max_calls.
    Under a template that opens the reasoning, a turn that starts inside it (every turn of ours, the
    first of upstream's) and does not close it starts by closing it (an empty reasoning)."""
    chat = _chat_tokens(processor, len(tokenizer_of(processor)), "cpu")
    prompt = build_prompt(processor, env.registry_of(sample), sample, env.protocol)
    row = _Row(Trajectory(sample=sample, group=0, prompt_ids=prompt["input_ids"][0].tolist(), response_ids=[],
                          loss_mask=[], sample_logprobs=[], position_ids=None, pixel_values=prompt.get("pixel_values"),
                          image_grid_thw=prompt.get("image_grid_thw")), env.registry_of(sample))
    cfg = RolloutConfig(max_turns=env.max_calls if max_turns is None else max_turns, max_response_tokens=10 ** 9,
                        protocol=env.protocol)
    for number, text in enumerate(turn_texts):
        if row.traj.stop_reason:
            raise ValueError(f"sample {sample.id!r}: demonstration turn {number + 1} of {len(turn_texts)} comes "
                             f"after the trajectory ended ({row.traj.stop_reason})")
        row.turn_start = len(row.traj.response_ids)
        inside_reasoning = THINK_OPEN in chat.glue_after and (env.protocol == "ours" or not row.traj.response_ids)
        if inside_reasoning and THINK_CLOSE not in text:
            text = f"\n{THINK_CLOSE}\n\n{text}"
        ids = chat.tokenizer(text, add_special_tokens=False)["input_ids"]
        row.append(ids + [chat.im_end] if env.protocol == "upstream" else ids, sampled=True)  # upstream turns end at EOS
        row.turn_end = "given"
        close_turn(row, chat, cfg)
        if number < len(turn_texts) - 1:
            given = results is not None and not row.traj.stop_reason and not row.discarded  # a call, its result given
            if given and not results:
                raise ValueError(f"sample {sample.id!r}: demonstration turn {number + 1} makes a call and no "
                                 "result is left for it")
            execute_turn([row], env, chat, cfg, results[:1] if given else None)
            results = results[1:] if given else results
        row.discarded = False
    if results:
        raise ValueError(f"sample {sample.id!r}: {len(results)} result(s) left over: the turns make fewer calls")
    if not row.traj.stop_reason:
        turns = row.traj.turns
        row.traj.stop_reason = "invalid" if not turns or turns[-1].action.kind == "invalid" else "max_turns"
    return finish(row)
