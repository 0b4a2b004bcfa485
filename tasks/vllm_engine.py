"""One vLLM engine, kept alive in a child process of the vLLM environment, and the pipe to it.

    with VllmEngine(env, llm_args, workdir) as engine:      # the child starts, then vLLM's engine
        engine.generate(prompt_ids, sampling, seeds)        # token ids per prompt, per sample
        engine.prompt_logprobs(sequences, starts)           # log-probs of given tokens (a judge, a check)
        engine.load_weights(folder)                         # new weights, in place (online RL)
        engine.add_lora(name, folder) / remove_lora(name)   # adapters, served beside the base

Why a child process: vLLM lives in its own environment (tasks/vllm_env.py; it pins its own
transformers and torch build); a pipeline runs stages in threads of one long process, where vLLM
will not start its engine outside the main thread; an engine that exits gives back every byte of
its memory (in-process engines have not reliably freed GPU memory: vllm issues #1908, #3281,
#21073). The child runs vLLM's engine in its own process (VLLM_ENABLE_V1_MULTIPROCESSING=0) with
the single-process executor when one device suffices, so weights can be reloaded in place and no
third process starts. The pipe is a socket pair carrying JSON messages, one reply per request;
vLLM's log goes to `workdir/vllm.log`, whose tail is in every error.

The child's side (`python -m tasks.vllm_engine FD`, at the bottom) imports only vllm and the
standard library: it must not need the main environment's packages.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

LOG_NAME = "vllm.log"


class VllmEngineError(RuntimeError):
    """The engine failed (or its process died); the message ends with the tail of vLLM's log."""

    def __init__(self, message: str, lora: bool = False):
        super().__init__(message)
        self.lora = lora  # the failure was loading a LoRA adapter (the caller may merge it instead)


# ---- the parent's side -----------------------------------------------------------------------


class VllmEngine:
    """A vLLM `LLM(**llm_args)` in a child process run by `env.python` (a tasks.vllm_env.VllmEnv).

    extra_env: environment variables for the child (threads, KV cache size); loras: adapters to
    load right after the engine starts, {name: folder} (a failure there is VllmEngineError with
    lora=True, so the caller can fall back to merging them)."""

    conn = None  # until the child runs

    def __init__(self, env, llm_args: dict, workdir: str | Path, extra_env: dict | None = None,
                 loras: dict[str, str] | None = None, start_timeout: float = 1800.0):
        import socket
        import subprocess
        from multiprocessing.connection import Connection

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_file = self.workdir / LOG_NAME
        parent, child = socket.socketpair()
        root = str(Path(__file__).resolve().parent.parent)  # this `tasks` package, whatever the child's cwd
        child_env = {**os.environ, **(extra_env or {}), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                     "PYTHONPATH": root}  # the main environment's PYTHONPATH holds nothing the child may use
        child_env.pop("PYTHONHOME", None)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [env.python, "-m", "tasks.vllm_engine", str(child.fileno())], pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env, cwd=str(self.workdir),
            )
        child.close()
        self.conn = Connection(parent.detach())
        self.env = env
        started = time.perf_counter()
        try:
            reply = self._call({"op": "start", "llm": llm_args, "loras": loras or {}}, timeout=start_timeout)
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.perf_counter() - started  # the child's start, its imports and vLLM's engine start
        self.import_seconds = reply["import_seconds"]  # `from vllm import LLM` in the child
        self.dtype = reply.get("dtype")

    # -- requests --

    def generate(self, prompt_ids: list[list[int]], sampling: dict, seeds: list[int] | None = None,
                 lora: str | None = None, on_progress=None) -> list[list[list[int]]]:
        """Per prompt, its samples' generated token ids (eos included when reached): one
        SamplingParams(**sampling, seed=s) per prompt (s from `seeds`), with adapter `lora` or none.
        on_progress(done, total): about once a second, the samples finished so far."""
        if not prompt_ids:
            return []
        reply = self._call({"op": "generate", "prompts": [list(map(int, p)) for p in prompt_ids], "sampling": sampling,
                            "seeds": seeds, "lora": lora, "progress": on_progress is not None}, on_progress=on_progress)
        return reply["token_ids"]

    def prompt_logprobs(self, sequences: list[list[int]], starts: list[int], lora: str | None = None) -> list[list[float]]:
        """Per sequence, the log-probs of its tokens from index `start` on, each given the tokens before it
        (vLLM's prompt_logprobs, from the raw logits: temperature 1)."""
        if not sequences:
            return []
        reply = self._call({"op": "prompt_logprobs", "sequences": [list(map(int, s)) for s in sequences],
                            "starts": list(starts), "lora": lora})
        return reply["logprobs"]

    def load_weights(self, folder: str | Path) -> float:
        """Replace the model's weights in place with the safetensors files in `folder` (checkpoint names,
        any dtype); the prefix cache is dropped. Returns the seconds it took."""
        return self._call({"op": "load_weights", "folder": str(folder)})["seconds"]

    def add_lora(self, name: str, folder: str | Path) -> None:
        """Serve the peft adapter in `folder` as `name` (generate(..., lora=name)); the prefix cache is dropped."""
        self._call({"op": "add_lora", "name": name, "folder": str(folder)})

    def remove_lora(self, name: str) -> None:
        self._call({"op": "remove_lora", "name": name})

    # -- the pipe --

    def _call(self, message: dict, timeout: float | None = None, on_progress=None) -> dict:
        """Send one request; its reply (progress notes before it go to on_progress)."""
        if self.conn is None:
            raise VllmEngineError("the vLLM engine is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.conn.send_bytes(json.dumps(message).encode())
            while True:
                while not self.conn.poll(1.0):  # the child may die without closing its end (killed)
                    if self.process.poll() is not None and not self.conn.poll(0):
                        raise EOFError
                    if deadline is not None and time.monotonic() > deadline:
                        raise VllmEngineError(f"vLLM did not answer '{message['op']}' within {timeout:.0f} s; "
                                              "the end of its log:\n" + self.log_tail())
                reply = json.loads(self.conn.recv_bytes())
                if "progress" not in reply:
                    break
                if on_progress is not None:
                    on_progress(reply["progress"], reply["total"])
        except (EOFError, OSError):
            code = self.process.wait()
            raise VllmEngineError(f"the vLLM engine's process ended (exit code {code}) during '{message['op']}'; "
                                  "the end of its log:\n" + self.log_tail()) from None
        if "error" in reply:
            raise VllmEngineError(f"vLLM failed in '{message['op']}': {reply['error']}\nthe end of its log:\n"
                                  + self.log_tail(), lora=reply.get("lora", False))
        return reply

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """Stop the engine and its process (its memory goes with it)."""
        import subprocess

        if self.conn is not None:
            try:
                if self.process.poll() is None:
                    self.conn.send_bytes(json.dumps({"op": "close"}).encode())
            except OSError:
                pass
            self.conn.close()
            self.conn = None
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- the child's side: python -m tasks.vllm_engine FD ------------------------------------------


def serve(conn) -> None:
    """Answer the parent's requests until it says close (or goes away)."""
    import traceback

    llm, loras = None, {}  # loras: name -> LoRARequest
    next_lora_id = [1]

    def lora_request(name):
        return None if name is None else loras[name]

    def add_lora(name, folder):
        from vllm.lora.request import LoRARequest

        request = LoRARequest(name, next_lora_id[0], folder)
        next_lora_id[0] += 1
        if not llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM did not load the adapter {folder}")
        old = loras.pop(name, None)
        loras[name] = request
        if old is not None:
            llm.llm_engine.remove_lora(old.lora_int_id)
        llm.reset_prefix_cache()  # cached prompt blocks were computed with the old adapter

    while True:
        try:
            message = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        op = message["op"]
        reply: dict = {}
        try:
            if op == "close":
                conn.send_bytes(b"{}")
                return
            if op == "start":
                started = time.perf_counter()
                from vllm import LLM

                reply["import_seconds"] = time.perf_counter() - started
                try:
                    llm = LLM(**message["llm"])
                except Exception as e:  # with LoRA on: the model may be one vLLM's LoRA does not cover
                    if not message["llm"].get("enable_lora"):
                        raise
                    traceback.print_exc()
                    conn.send_bytes(json.dumps({"error": f"{type(e).__name__}: {e}", "lora": True}).encode())
                    continue
                reply["seconds"] = time.perf_counter() - started
                reply["dtype"] = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")
                for name, folder in message["loras"].items():
                    try:
                        add_lora(name, folder)
                    except Exception as e:  # noqa: BLE001 - reported: the caller merges the adapter instead
                        reply = {"error": f"{type(e).__name__}: {e}", "lora": True}
                        break
            elif op == "generate":
                from vllm import SamplingParams

                seeds = message["seeds"] or [None] * len(message["prompts"])
                params = [SamplingParams(**message["sampling"], seed=seed) for seed in seeds]
                prompts = [{"prompt_token_ids": ids} for ids in message["prompts"]]  # vllm.inputs.TokensPrompt
                outputs = llm.generate(prompts, params, lora_request=lora_request(message["lora"]),
                                       use_tqdm=progress_notes(conn) if message.get("progress") else False)
                reply["token_ids"] = [[list(map(int, c.token_ids)) for c in sorted(o.outputs, key=lambda c: c.index)]
                                      for o in outputs]  # in the order of the prompts
            elif op == "prompt_logprobs":
                from vllm import SamplingParams

                params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
                outputs = llm.generate([{"prompt_token_ids": s} for s in message["sequences"]], params, use_tqdm=False,
                                       lora_request=lora_request(message["lora"]))
                reply["logprobs"] = []
                for sequence, start, output in zip(message["sequences"], message["starts"], outputs):
                    # prompt_logprobs[i]: {token id: Logprob} at position i (None at 0), the given token among them
                    entries = output.prompt_logprobs
                    reply["logprobs"].append([float(entries[i][token].logprob)
                                              for i, token in enumerate(sequence) if i >= max(1, start)])
            elif op == "load_weights":
                started = time.perf_counter()
                llm.collective_rpc("reload_weights", kwargs={"weights_path": message["folder"]})
                llm.reset_prefix_cache()  # cached blocks hold the old weights' keys and values
                reply["seconds"] = time.perf_counter() - started
            elif op == "add_lora":
                add_lora(message["name"], message["folder"])
            elif op == "remove_lora":
                request = loras.pop(message["name"])
                llm.llm_engine.remove_lora(request.lora_int_id)
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception as e:  # noqa: BLE001 - the parent raises it with the log's tail
            traceback.print_exc()
            sys.stdout.flush()
            reply = {"error": f"{type(e).__name__}: {e}"}
        conn.send_bytes(json.dumps(reply).encode())


def progress_notes(conn):
    """A tqdm class for LLM.generate(use_tqdm=...) that sends {"progress": done, "total": n} to the
    parent at most once a second, and draws nothing."""
    from tqdm import tqdm

    class Notes(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, file=open(os.devnull, "w"), **kwargs)  # noqa: SIM115 - closed with the bar
            self.noted = 0.0

        def update(self, n=1):
            super().update(n)
            if time.monotonic() - self.noted >= 1.0 or self.n == self.total:
                self.noted = time.monotonic()
                conn.send_bytes(json.dumps({"progress": self.n, "total": self.total}).encode())

        def close(self):
            super().close()
            self.fp.close()

    return Notes


def main(argv: list[str]) -> int:
    from multiprocessing.connection import Connection

    serve(Connection(int(argv[0])))
    return 0


if __name__ == "__main__":  # vLLM may start processes by spawn: they re-import this module without running this
    sys.exit(main(sys.argv[1:]))
