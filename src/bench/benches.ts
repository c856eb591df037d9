/** Every bench `deno task bench` runs, in order; add new ones to the list. */
import type { Bench } from "./harness.ts";
import { matmulBench } from "./matmul.ts";
import { nf4MatmulBench } from "./nf4_matmul.ts";
import { roundTripBench } from "./round_trip.ts";
import { studentBench } from "./student.ts";

export const BENCHES: readonly Bench[] = [
  roundTripBench,
  matmulBench,
  nf4MatmulBench,
  studentBench,
];
