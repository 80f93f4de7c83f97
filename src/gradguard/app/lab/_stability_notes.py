"""What the stability benchmark's tables cannot say on their own: why the defaults lose where
they lose, each with the measurement behind it. Copied into docs/stability.md after the answers;
:func:`gradguard.app.lab.stability.render` writes the page again when this changes."""

NOTES = """
### Where the defaults lose, and why (measured)

**The defaults' numbers are the same in every units** (the scale property,
`tests/test_scale_free.py`: a loss times a power of two takes the same steps bit for bit). The
units variants here multiply the loss by 100 and 0.01, which are not powers of two: the last bits
differ, and a chaotic run (S1) drifts apart by seed noise, not by units. `clip-1` and the peers
move by units: `clip-1` goes from 0.5344 to never on S2 and from 0.2688 to 0.4745 on S4, AGC from
0.2217 to 0.447 on S4 (AGC clips relative to the weights' norms, which the loss's units do not
scale).

**S1 (char-RNN, SGD at lr 1.0, momentum 0.9): the tuned clip is a learning-rate cut.** The tuned
clip is 0.3, about a fifth of the run's first gradient norm (1.2 to 1.5), so it shortens every
step: 100% of the steps are clipped. Unclipped at lr 0.3 the same run ends at 2.585, 2.552,
2.501 (seeds 0-2; `run_one("S1", "none", lr=0.3)`), the tuned clip's 2.54. A threshold relative
to the run's own norms does not cut the learning rate of a healthy run (that is the point of it),
so it cannot make this one; only the divergence detector's back-offs can, and they come once the
loss has risen beyond its own noise (10 deviations): on seed 0 at steps 14 and 25, when the loss
is 45; on seed 1 never, the loss stalls at 6-7 against 4.6 at the start and the run ends at 4.74,
just above it, so the benchmark counts it diverged. With the detector's noise at 6 instead of 10
seeds 0 and 2 end at 3.30 and 3.01, but a healthy SGD regression on batches of 4 then backs off
within 500 steps on one seed in eight (`tests/test_defaults.py` keeps that run at no back-off).
clip-1, zclip and AGC at their defaults leave S1 above its start on 3 of its 9 runs each (over
the three units), the defaults on 4.

**S4 (a corrupt batch at step 2 and one late, AdamW regression): the tuned clip is a better
optimizer for this model, faults or not.** The faults cost the defaults 0.009 (final 0.3449
against their clean twin's 0.3421, the same batches without the faults, itself the unguarded
clean twin's 0.3416). The tuned clip at 0.1-0.3 ends at 0.2688 with a clean twin at 0.2634, and
AGC at 0.2217 with a clean twin at 0.2210: clipping every step of this small AdamW regression
trains it better without any fault (the earlier finding, clip-0.25 and AGC(0.01) as regularizers
on tiny models). Doing that on every run would cost the clean suite its learning rate.

**Mean rank behind AGC and StableSPAM on all 21 rows, ahead of every peer on the 15 rows with a
fault or an explosion.** On the clean S6 and S7 (and their units variants) the defaults end where
no clipping ends (they should: nothing is wrong there), while AGC (2.774 and 3.205 against 2.816
and 3.228) and StableSPAM (2.792, 3.208), a per-unit clip and a different optimizer, train those
tiny transformers better, which ranks them ahead on six rows without a fault. On S1-S5 in all
units the defaults' mean rank is 2.47, AGC's 3.80, StableSPAM's 4.61 (its 9 Adam rows; the
defaults' 2.44 there), torch's clip at 1.0 4.27.

**What the clean suite costs.** No skip, back-off or rollback on any of the defaults' 40 clean-suite
runs (8 scenarios, 5 seeds), nor on S6 and S7. Clip rates are 1-5% except the two CNNs, whose
healthy norms grow tenfold over their first ~50 steps: C1 (SGD) 19% and C2 (Adam) 77% of the steps
clipped, at no cost in final loss (both at or below no clipping; their seed spread is wide, 1.0 and
0.076: a plain 8-layer CNN at a learning rate that trains it is a noisy run).
"""
