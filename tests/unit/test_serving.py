import json
import shlex

from specops.serving import vllm_serve_command, vllm_serve_short


def test_serve_command_round_trips_through_a_shell() -> None:
    cmd = vllm_serve_command("meta-llama/Llama-3.1-8B-Instruct", "/ckpt/eagle 3", 3)
    argv = shlex.split(cmd)
    assert argv[:3] == ["vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct"]
    assert argv[3] == "--speculative-config"
    assert json.loads(argv[4]) == {"model": "/ckpt/eagle 3", "method": "eagle3", "num_speculative_tokens": 3}


def test_short_form_quotes_the_directory() -> None:
    assert shlex.split(vllm_serve_short("/a b")) == ["vllm", "serve", "/a b"]
