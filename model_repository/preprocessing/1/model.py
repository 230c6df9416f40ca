"""Triton adapter: request tensors -> orpheus_triton.preprocess -> LLM input tensors."""

import time
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from orpheus_triton import constants as c
from orpheus_triton.callers import CallerLeases, CallersFull, admission_check
from orpheus_triton.metrics import CALLERS_REFUSED_METRIC, MetricSet, release
from orpheus_triton.preprocess import SynthesisOptions, check_max_seq_len, llm_inputs
from orpheus_triton.prompt import PromptError, Voices, load_tokenizer
from orpheus_triton.serving import SHUTTING_DOWN, draining, log_to_triton, model_parameters


def _optional(request, name, cast):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = tensor.as_numpy().reshape(-1)
    if value.size != 1:
        raise PromptError(f"input {name!r} must hold exactly one value, got {value.size}")
    value = value[0]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise PromptError(f"input {name!r} is not UTF-8 text: {error}") from None
    return cast(value)


class TritonPythonModel:
    def initialize(self, args):
        log_to_triton(pb_utils)
        parameters = model_parameters(args)
        self.tokenizer = load_tokenizer(parameters["llm_dir"])
        self.voices = Voices.parse(parameters["voices"], parameters["default_voice"])
        self.max_seq_len = int(parameters["max_seq_len"]) or None  # 0: unknown here, the LLM checks
        self.max_prompt_tokens = int(parameters.get("max_prompt_tokens", 0)) or None  # 0: max_seq_len bounds it
        if self.max_seq_len:
            check_max_seq_len(self.tokenizer, self.voices, self.max_seq_len)
        self.max_callers = int(parameters.get("max_callers", 0))  # 0: no bound beyond the llm stage's
        self.callers = CallerLeases.from_environment()
        admission_check(self.callers, self.max_callers)
        self.metrics = MetricSet(pb_utils, c.PREPROCESSING_MODEL, args["model_instance_name"])
        self.refused = self.metrics.counter(CALLERS_REFUSED_METRIC, "Callers turned away as `server busy`: as "
                                            "many in flight as the server takes (serve --max-callers)")

    def execute(self, requests):
        if draining():  # the server is stopping: new streams go elsewhere, those in flight finish
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"orpheus: {SHUTTING_DOWN}", pb_utils.TritonError.UNAVAILABLE)) for _ in requests]
        responses = []
        for request in requests:
            started = time.time()
            try:
                given = {
                    "text": _optional(request, c.IN_TEXT, str),
                    "voice": _optional(request, c.IN_VOICE, str),
                    "max_tokens": _optional(request, c.IN_MAX_TOKENS, int),
                    "temperature": _optional(request, c.IN_TEMPERATURE, float),
                    "top_p": _optional(request, c.IN_TOP_P, float),
                    "repetition_penalty": _optional(request, c.IN_REPETITION_PENALTY, float),
                    "seed": _optional(request, c.IN_SEED, int),
                }
                if given["text"] is None:
                    raise PromptError(f"input {c.IN_TEXT!r} is required")
                options = SynthesisOptions(**{k: v for k, v in given.items() if v is not None})
                tensors = llm_inputs(self.tokenizer, options, self.voices, self.max_seq_len, self.max_prompt_tokens)
                tensors[c.REQUEST_START] = np.array([[started]], dtype=np.float64)
                if self.callers is not None and request.request_id():  # one without an id: the llm refuses it
                    self.callers.admit(request.request_id(), self.max_callers)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in tensors.items()]))
            except CallersFull as error:  # to retry elsewhere, as a draining server's refusal
                self.refused.increment(1)
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"orpheus: {error}", pb_utils.TritonError.UNAVAILABLE)))
            except (PromptError, UnicodeDecodeError, ValueError) as error:  # the request's own: INVALID_ARG
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"orpheus: {error}", pb_utils.TritonError.INVALID_ARG)))
            except Exception as error:  # noqa: BLE001 (a fault: this request hears it, the batch's others go on)
                pb_utils.Logger.log_error(f"orpheus preprocessing failed:\n{traceback.format_exc()}")
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"orpheus preprocessing: internal error ({error}); see server log")))
        return responses

    def finalize(self):
        release(self)  # before the interpreter's teardown, where the stub would crash (metrics.release)
