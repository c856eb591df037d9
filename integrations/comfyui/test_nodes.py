"""Tests of the ComfyUI nodes against a running `distill serve` and `distill encode` files.

Run by tests/integrations/comfyui_test.ts (`deno task test:integrations`), which starts the
server with a tiny random student, writes the encode files, and passes their places in
DISTILL_TEST_* variables. ComfyUI itself is not needed: `load_custom_node` and `run_node`
stand in for how ComfyUI imports a custom node folder and calls a node.
"""

import importlib.util
import os
import sys
import unittest
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "torch"))
from distill_resampler import read_safetensors  # noqa: E402  (an independent reader)

SERVER = os.environ["DISTILL_TEST_SERVER"]
TOKEN = os.environ["DISTILL_TEST_TOKEN"]
SINGLE_FILE = os.environ["DISTILL_TEST_SINGLE"]  # "a red cube on a blue sphere", negative "blurry", F32
LIST_FILE = os.environ["DISTILL_TEST_LIST"]  # JSON: ["a cat", "two dogs"], no negative


def load_custom_node(folder):
    """As ComfyUI loads custom_nodes/<folder>: import its __init__.py as a package."""
    spec = importlib.util.spec_from_file_location(
        "distill_comfyui", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.NODE_CLASS_MAPPINGS, module.NODE_DISPLAY_NAME_MAPPINGS


def run_node(cls, **inputs):
    """As ComfyUI runs a node: inputs must be declared, required ones given; FUNCTION is called."""
    types = cls.INPUT_TYPES()
    declared = {**types["required"], **types.get("optional", {})}
    for name, spec in declared.items():
        assert isinstance(spec, tuple) and isinstance(spec[0], str), f"{name}: {spec}"
    assert not set(inputs) - set(declared), f"undeclared inputs {set(inputs) - set(declared)}"
    assert not set(types["required"]) - set(inputs), "missing required inputs"
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES)
    return out


NODES, NAMES = load_custom_node(HERE)


class NodeTest(unittest.TestCase):
    def check_conditioning(self, cond):
        """ComfyUI's CONDITIONING: [[prompt_embeds [1, 77, 2048], {"pooled_output": [1, 1280]}]]."""
        self.assertEqual(len(cond), 1)
        embeds, extra = cond[0]
        self.assertEqual(tuple(embeds.shape), (1, 77, 2048))
        self.assertEqual(tuple(extra["pooled_output"].shape), (1, 1280))
        self.assertEqual(embeds.dtype, torch.float32)
        return embeds, extra["pooled_output"]

    def encode(self, prompt, negative_prompt, token=TOKEN):
        return run_node(
            NODES["DistillEncode"], server_url=SERVER, prompt=prompt, negative_prompt=negative_prompt, token=token
        )

    def test_registration(self):
        self.assertEqual(NAMES["DistillEncode"], "Distill Encode")
        self.assertEqual(NAMES["LoadDistillConditioning"], "Load Distill Conditioning")
        for cls in NODES.values():
            self.assertEqual(cls.RETURN_TYPES, ("CONDITIONING", "CONDITIONING"))

    def test_encode_node_equals_the_encode_file(self):
        positive, negative = self.encode("a red cube on a blue sphere", "blurry")
        expected = read_safetensors(SINGLE_FILE)
        for cond, seq, pooled in [
            (positive, "prompt_embeds", "pooled_prompt_embeds"),
            (negative, "negative_prompt_embeds", "negative_pooled_prompt_embeds"),
        ]:
            embeds, pooled_out = self.check_conditioning(cond)
            self.assertTrue(torch.equal(embeds, expected[seq]))
            self.assertTrue(torch.equal(pooled_out, expected[pooled]))
            self.assertGreater(embeds.abs().max().item(), 0)

    def test_empty_negative_prompt_gives_zeros(self):
        positive, negative = self.encode("a cat", "")
        self.assertGreater(self.check_conditioning(positive)[0].abs().max().item(), 0)
        for t in self.check_conditioning(negative):
            self.assertEqual(t.abs().max().item(), 0)

    def test_load_node_reads_safetensors_and_json_files(self):
        positive, negative = run_node(NODES["LoadDistillConditioning"], path=SINGLE_FILE, index=0)
        served, served_negative = self.encode("a red cube on a blue sphere", "blurry")
        self.assertTrue(torch.equal(self.check_conditioning(positive)[0], served[0][0]))
        self.assertTrue(torch.equal(self.check_conditioning(negative)[1], served_negative[0][1]["pooled_output"]))
        positive, negative = run_node(NODES["LoadDistillConditioning"], path=LIST_FILE, index=1)
        embeds, pooled = self.check_conditioning(positive)
        alone = self.check_conditioning(self.encode("two dogs", "")[0])
        # The file's prompts were padded to a common length in one pass: close, not bit-equal.
        self.assertLess((embeds - alone[0]).abs().max().item(), 1e-4)
        self.assertLess((pooled - alone[1]).abs().max().item(), 1e-4)
        self.assertEqual(self.check_conditioning(negative)[0].abs().max().item(), 0)
        with self.assertRaisesRegex(ValueError, r"holds 2 prompt\(s\); index 2 is out of range"):
            run_node(NODES["LoadDistillConditioning"], path=LIST_FILE, index=2)

    def test_server_errors_are_reported(self):
        with self.assertRaisesRegex(RuntimeError, "answered 401: missing or wrong 'Authorization"):
            self.encode("a cat", "", token="wrong")
        with self.assertRaisesRegex(RuntimeError, "answered 413: prompt 1 has 9000 characters"):
            self.encode("x" * 9000, "")
        with self.assertRaisesRegex(RuntimeError, "cannot reach distill serve"):
            run_node(NODES["DistillEncode"], server_url="http://127.0.0.1:1", prompt="a", negative_prompt="")


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])
