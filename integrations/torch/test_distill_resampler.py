"""Parity of DistillResampler with distill's own resampler.

Run by tests/integrations/torch_resampler_test.ts (`deno task test:integrations`), which
writes a random resampler folder and a case file (input hidden states, key lengths, and
distill's WebGPU outputs) into $DISTILL_PARITY_DIR and runs this script.
"""

import json
import os
import sys
import tempfile
import unittest
from pathlib import Path

import torch

from distill_resampler import DistillResampler, read_safetensors

CASE_DIR = Path(os.environ["DISTILL_PARITY_DIR"])


def max_abs(a, b):
    return (a.double() - b.double()).abs().max().item()


class ParityTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.case = read_safetensors(CASE_DIR / "case.safetensors")
        cls.hidden = cls.case["hidden"]
        lengths = cls.case["key_lengths"].long()
        cls.mask = torch.arange(cls.hidden.shape[1])[None, :] < lengths[:, None]

    def run_model(self, model, dtype=torch.float64, mask="default"):
        with torch.no_grad():
            return model.to(dtype)(self.hidden.to(dtype), self.mask if mask == "default" else mask)

    def test_matches_distill_in_float64_and_float32(self):
        model = DistillResampler.from_pretrained(CASE_DIR / "resampler")
        for dtype in (torch.float64, torch.float32):
            seq, pooled = self.run_model(model, dtype)
            self.assertEqual(tuple(seq.shape), tuple(self.case["seq"].shape))
            self.assertEqual(tuple(pooled.shape), tuple(self.case["pooled"].shape))
            err_seq = max_abs(seq, self.case["seq"])
            err_pooled = max_abs(pooled, self.case["pooled"])
            print(f"{dtype}: max |torch - distill| seq {err_seq:.2e}, pooled {err_pooled:.2e}")
            self.assertLess(err_seq, 1e-4)
            self.assertLess(err_pooled, 1e-4)

    def test_the_mask_matters(self):
        # Without it the padded rows see their padding: the parity above would then fail.
        model = DistillResampler.from_pretrained(CASE_DIR / "resampler")
        seq, _ = self.run_model(model, mask=None)
        self.assertLess(max_abs(seq[0], self.case["seq"][0]), 1e-4)
        self.assertGreater(max_abs(seq[1], self.case["seq"][1]), 1e-3)
        self.assertGreater(max_abs(seq[2], self.case["seq"][2]), 1e-3)

    def test_save_pretrained_round_trips_in_distills_format(self):
        model = DistillResampler.from_pretrained(CASE_DIR / "resampler")
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            written = (Path(tmp) / "resampler_config.json").read_text()
            original = (CASE_DIR / "resampler" / "resampler_config.json").read_text()
            self.assertEqual(json.loads(written), json.loads(original))  # no optional keys
            again = DistillResampler.from_pretrained(tmp)
        for a, b in zip(self.run_model(model), self.run_model(again)):
            self.assertEqual(max_abs(a, b), 0)

    def test_optional_position_embedding_and_seq_bias(self):
        base = DistillResampler.from_pretrained(CASE_DIR / "resampler")
        config = {**base.config, "num_positions": 9, "seq_bias": True}
        model = DistillResampler(**config)
        state = model.state_dict()
        self.assertEqual(tuple(state["pos_emb"].shape), (9, config["dim"]))
        self.assertEqual(tuple(state["seq_bias"].shape), (config["num_queries"], config["dim_seq"]))
        model.load_state_dict({**base.state_dict(), "pos_emb": state["pos_emb"], "seq_bias": state["seq_bias"]})
        # Zero-initialised, both leave the output as it was.
        for a, b in zip(self.run_model(base), self.run_model(model)):
            self.assertEqual(max_abs(a, b), 0)
        with torch.no_grad():
            model.seq_bias.copy_(torch.randn_like(model.seq_bias))
            seq_bias = model.seq_bias.double()
        (seq0, pooled0), (seq1, pooled1) = self.run_model(base), self.run_model(model)
        self.assertLess(max_abs(seq1, seq0 + seq_bias), 1e-12)
        self.assertEqual(max_abs(pooled1, pooled0), 0)
        # pos_emb[t] is added to proj_in's output at position t: the same as a hook doing so.
        with torch.no_grad():
            model.seq_bias.zero_()
            model.pos_emb.copy_(torch.randn_like(model.pos_emb))
        pos = model.pos_emb.detach().double()
        hook = base.proj_in.register_forward_hook(lambda m, i, out: out + pos[: out.shape[1]])
        with_pos, by_hook = self.run_model(model)[0], self.run_model(base)[0]
        hook.remove()
        self.assertEqual(max_abs(with_pos, by_hook), 0)
        self.assertGreater(max_abs(with_pos, seq0), 1e-3)
        with self.assertRaisesRegex(ValueError, "num_positions 9"):
            model(torch.zeros(1, 10, config["dim_in"], dtype=torch.float64))
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            again = DistillResampler.from_pretrained(tmp, dtype=torch.float64)
            self.assertEqual(again.config["num_positions"], 9)
            # The file holds F32 weights; the model ran in float64.
            self.assertLess(max_abs(self.run_model(again)[0], with_pos), 1e-6)


if __name__ == "__main__":
    # A folder with the optional parts (DISTILL_PARITY_ONLY=1) is checked for parity alone: the
    # other tests build those parts themselves on top of a folder without them.
    only = ["ParityTest.test_matches_distill_in_float64_and_float32"]
    unittest.main(argv=[sys.argv[0], "-v", *(only if os.environ.get("DISTILL_PARITY_ONLY") else [])])
