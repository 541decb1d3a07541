//! The cheater catalogue (docs/verification.md §4): miners that return outputs cheaper than
//! (or other than) the real ones, for the tests and demos of the verifier. Built only with
//! the `cheaters` feature; without it the worker has no way to cheat.
//!
//! A cheating worker runs the honest path with a [`Cheater`] hooked in at four points:
//! when an assignment arrives, instead of running the model, after running it, and before
//! answering.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use sundara_schemas::{DType, Tensor, TensorSpec, now_ms};

/// How the worker treats its work. Everything but `Honest` is a cheater, for the tests and
/// demos of the verifier: each returns outputs cheaper than (or other than) the real ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Behaviour {
    /// Runs every task and answers with its outputs.
    Honest,
    /// Honest, on hardware whose floats differ slightly: every float output moved by a
    /// random relative 1e-6 (the noise between CPUs, GPUs and libraries). Must never be
    /// judged wrong.
    #[value(name = "noisy")]
    HonestNoisy,
    /// Runs the model, then returns plausible but wrong outputs: float rows rotated by one
    /// (so top-1 moves) and scaled, integers shifted, bools flipped. Deterministic, so two
    /// such miners agree with each other: colluders.
    #[value(name = "rotate", alias = "dishonest")]
    Dishonest,
    /// A model with perturbed weights: outputs off by about 1 % (emulated on the outputs).
    WrongModel,
    /// A quantised copy: float outputs rounded to bfloat16 (8 bits of mantissa).
    #[value(alias = "quantized")]
    Quantised,
    /// No inference: uniform random values of the declared output shapes.
    #[value(name = "random")]
    RandomOutputs,
    /// No inference: zeros of the declared output shapes.
    #[value(name = "constant")]
    ConstantOutputs,
    /// Runs a model's first task, then returns those outputs for every later task of it.
    Replay,
    /// Accepts assignments (acks them) and never answers: holds slots for nothing.
    NeverAnswer,
    /// Runs the model honestly but answers only after the assignment's deadline.
    Late,
}

impl Behaviour {
    /// Every cheater, for tests that go through them all.
    pub const CHEATERS: [Behaviour; 8] = [
        Behaviour::Dishonest,
        Behaviour::WrongModel,
        Behaviour::Quantised,
        Behaviour::RandomOutputs,
        Behaviour::ConstantOutputs,
        Behaviour::Replay,
        Behaviour::NeverAnswer,
        Behaviour::Late,
    ];

    /// Parses `honest`, `noisy`, `rotate` (= dishonest), `wrong-model`, `quantised`,
    /// `random`, `constant`, `replay`, `never-answer` or `late`.
    pub fn parse(text: &str) -> Result<Behaviour, String> {
        Ok(match text {
            "honest" => Behaviour::Honest,
            "noisy" => Behaviour::HonestNoisy,
            "rotate" | "dishonest" => Behaviour::Dishonest,
            "wrong-model" => Behaviour::WrongModel,
            "quantised" | "quantized" => Behaviour::Quantised,
            "random" => Behaviour::RandomOutputs,
            "constant" => Behaviour::ConstantOutputs,
            "replay" => Behaviour::Replay,
            "never-answer" => Behaviour::NeverAnswer,
            "late" => Behaviour::Late,
            other => {
                return Err(format!(
                    "unknown behaviour {other:?}: honest, noisy, rotate, wrong-model, quantised, random, constant, replay, never-answer, late"
                ));
            }
        })
    }

    /// The demo's liar (`rotate`): `sundara up` adds one where the build has the cheaters.
    pub fn liar() -> Option<Behaviour> {
        Some(Behaviour::Dishonest)
    }
}

/// A cheating worker's hooks into the honest path.
pub(crate) struct Cheater {
    behaviour: Behaviour,
    /// [`Behaviour::Replay`]: the first outputs of each model, returned for every later task.
    replayed: Mutex<HashMap<String, Vec<Tensor>>>,
}

impl Cheater {
    /// `None` for an honest worker: then nothing is hooked in.
    pub(crate) fn new(behaviour: Behaviour) -> Option<Cheater> {
        (behaviour != Behaviour::Honest).then(|| Cheater { behaviour, replayed: Mutex::default() })
    }

    /// Whether it acks every assignment and never answers.
    pub(crate) fn drops_assignments(&self) -> bool {
        self.behaviour == Behaviour::NeverAnswer
    }

    /// Outputs it sends for a task of `model` without running it, if any: fabricated ones
    /// of the declared `specs`, or the model's replayed first outputs.
    pub(crate) fn instead_of_running(
        &self,
        model: &str,
        specs: &[TensorSpec],
        inputs: &[Tensor],
    ) -> Option<Vec<Tensor>> {
        match self.behaviour {
            Behaviour::RandomOutputs | Behaviour::ConstantOutputs => {
                let rows = inputs.first().and_then(|t| t.shape.first().copied()).unwrap_or(1);
                Some(fabricate(specs, rows, self.behaviour == Behaviour::RandomOutputs))
            }
            Behaviour::Replay => self.replayed.lock().unwrap_or_else(|e| e.into_inner()).get(model).cloned(),
            _ => None,
        }
    }

    /// What it sends instead of the honest `outputs` of a task of `model` it ran.
    pub(crate) fn after_running(&self, model: &str, mut outputs: Vec<Tensor>) -> Vec<Tensor> {
        tamper(self.behaviour, &mut outputs);
        if self.behaviour == Behaviour::Replay {
            self.replayed.lock().unwrap_or_else(|e| e.into_inner()).insert(model.to_string(), outputs.clone());
        }
        outputs
    }

    /// Waits before answering: [`Behaviour::Late`] until past the assignment's `answer_by_ms`.
    pub(crate) async fn before_answering(&self, answer_by_ms: u64) {
        if self.behaviour == Behaviour::Late {
            tokio::time::sleep(Duration::from_millis(answer_by_ms.saturating_sub(now_ms()) + 200)).await;
        }
    }
}

/// Float values of a tensor, changed by `f` (other dtypes untouched).
fn map_floats(t: &mut Tensor, mut f: impl FnMut(usize, f64) -> f64) {
    match t.dtype {
        DType::F32 => {
            let v: Vec<f32> = t.values::<f32>().unwrap_or_default();
            let v: Vec<f32> = v.iter().enumerate().map(|(i, x)| f(i, *x as f64) as f32).collect();
            *t = Tensor::from_values(&t.name, t.shape.clone(), &v);
        }
        DType::F64 => {
            let v: Vec<f64> = t.values::<f64>().unwrap_or_default();
            let v: Vec<f64> = v.iter().enumerate().map(|(i, x)| f(i, *x)).collect();
            *t = Tensor::from_values(&t.name, t.shape.clone(), &v);
        }
        _ => {}
    }
}

/// Tampers honest outputs the way an output-tampering cheater does.
pub fn tamper(behaviour: Behaviour, outputs: &mut [Tensor]) {
    match behaviour {
        Behaviour::Dishonest => falsify(outputs),
        Behaviour::HonestNoisy => {
            let mut rng = rand::rng();
            outputs.iter_mut().for_each(|t| map_floats(t, |_, x| x * (1.0 + rng.random_range(-1e-6..=1e-6))));
        }
        // ±1 % per element, as a model with perturbed weights gives.
        Behaviour::WrongModel => outputs
            .iter_mut()
            .for_each(|t| map_floats(t, |i, x| x * (1.0 + 0.01 * if i % 2 == 0 { 1.0 } else { -1.0 }) + 1e-3)),
        // Round to bfloat16: keep the top 16 bits of each f32.
        Behaviour::Quantised => outputs
            .iter_mut()
            .for_each(|t| map_floats(t, |_, x| f32::from_bits(((x as f32).to_bits() + 0x8000) & 0xffff_0000) as f64)),
        _ => {}
    }
}

/// Outputs of the declared shapes without running anything: the first dynamic dimension
/// takes the task's rows, others 1. Random values, or zeros.
pub fn fabricate(specs: &[TensorSpec], rows: u64, random: bool) -> Vec<Tensor> {
    let mut rng = rand::rng();
    specs
        .iter()
        .map(|spec| {
            let mut first = true;
            let shape: Vec<u64> = spec
                .shape
                .iter()
                .map(|d| match d {
                    Some(v) => *v,
                    None if std::mem::take(&mut first) => rows,
                    None => 1,
                })
                .collect();
            let n = Tensor::checked_elements(&shape).unwrap_or(0) as usize;
            let mut t =
                Tensor { name: spec.name.clone(), dtype: spec.dtype, shape, data: vec![0; n * spec.dtype.size()] };
            if random {
                rng.fill(&mut t.data[..]);
                // Random bytes can be NaN or huge; random values in [0, 1) are what a cheater would send.
                map_floats(&mut t, |_, _| rng.random::<f64>());
            }
            t
        })
        .collect()
}

/// Tampers outputs the way [`Behaviour::Dishonest`] says.
pub fn falsify(outputs: &mut [Tensor]) {
    for t in outputs {
        let row = t.shape.last().copied().unwrap_or(1).max(1) as usize;
        match t.dtype {
            DType::F32 => {
                let mut v = t.values::<f32>().unwrap_or_default();
                v.chunks_mut(row).for_each(|r| r.rotate_left(1));
                v.iter_mut().for_each(|x| *x = *x * 1.05 + 0.01);
                *t = Tensor::from_values(&t.name, t.shape.clone(), &v);
            }
            DType::F64 => {
                let mut v = t.values::<f64>().unwrap_or_default();
                v.chunks_mut(row).for_each(|r| r.rotate_left(1));
                v.iter_mut().for_each(|x| *x = *x * 1.05 + 0.01);
                *t = Tensor::from_values(&t.name, t.shape.clone(), &v);
            }
            DType::Bool => t.data.iter_mut().for_each(|b| *b ^= 1),
            // Integers: bump the lowest byte of each element.
            _ => {
                let size = t.dtype.size();
                t.data.chunks_mut(size).for_each(|e| e[0] = e[0].wrapping_add(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cheater_changes_what_it_returns() {
        let honest = vec![Tensor::from_values("p", vec![2, 3], &[0.1f32, 0.7, 0.2, 0.5, 0.3, 0.2])];
        for b in [Behaviour::Dishonest, Behaviour::WrongModel, Behaviour::Quantised] {
            let mut out = honest.clone();
            tamper(b, &mut out);
            assert_eq!(out[0].shape, honest[0].shape, "{b:?}");
            assert_ne!(out, honest, "{b:?} left the outputs as they were");
        }
        let mut out = honest.clone();
        tamper(Behaviour::Honest, &mut out);
        assert_eq!(out, honest);
        let specs = [TensorSpec { name: "p".into(), dtype: DType::F32, shape: vec![None, Some(3)] }];
        let zeros = fabricate(&specs, 2, false);
        assert_eq!((zeros[0].shape.clone(), zeros[0].values::<f32>().unwrap()), (vec![2, 3], vec![0.0; 6]));
        let random = fabricate(&specs, 2, true)[0].values::<f32>().unwrap();
        assert!(random.iter().all(|v| (0.0..1.0).contains(v)));
        assert_eq!(Behaviour::parse("quantised"), Ok(Behaviour::Quantised));
        let mut noisy = honest.clone();
        tamper(Behaviour::HonestNoisy, &mut noisy);
        let (a, b) = (noisy[0].values::<f32>().unwrap(), honest[0].values::<f32>().unwrap());
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 2e-6 * y.abs()), "noise stays at 1e-6");
        assert!(Behaviour::parse("lazy").is_err());
    }

    #[test]
    fn falsified_outputs_differ_but_keep_shape() {
        let honest = vec![
            Tensor::from_values("p", vec![2, 3], &[0.1f32, 0.7, 0.2, 0.5, 0.3, 0.2]),
            Tensor::from_values("best", vec![2], &[1i64, 0]),
        ];
        let mut lied = honest.clone();
        falsify(&mut lied);
        assert_eq!(lied[0].shape, honest[0].shape);
        assert_ne!(lied[0], honest[0]);
        assert_eq!(lied[1].values::<i64>().unwrap(), vec![2, 1]);
        // Top-1 moves too, so even an argmax rule catches it.
        let row = lied[0].values::<f32>().unwrap();
        assert!(row[0] > row[1] && row[0] > row[2]);
    }

    #[test]
    fn hooks_follow_the_behaviour() {
        assert!(Cheater::new(Behaviour::Honest).is_none(), "an honest worker has no hooks");
        let specs = [TensorSpec { name: "p".into(), dtype: DType::F32, shape: vec![None, Some(3)] }];
        let inputs = [Tensor::from_values("x", vec![2, 4], &[0f32; 8])];
        let ran = vec![Tensor::from_values("p", vec![2, 3], &[0.1f32, 0.7, 0.2, 0.5, 0.3, 0.2])];

        let replay = Cheater::new(Behaviour::Replay).unwrap();
        assert_eq!(replay.instead_of_running("m@1", &specs, &inputs), None, "runs a model's first task");
        assert_eq!(replay.after_running("m@1", ran.clone()), ran);
        assert_eq!(replay.instead_of_running("m@1", &specs, &inputs), Some(ran.clone()), "then replays it");

        let constant = Cheater::new(Behaviour::ConstantOutputs).unwrap();
        let made = constant.instead_of_running("m@1", &specs, &inputs).unwrap();
        assert_eq!(made[0].shape, vec![2, 3]);

        let never = Cheater::new(Behaviour::NeverAnswer).unwrap();
        assert!(never.drops_assignments() && !replay.drops_assignments());
        assert_ne!(Cheater::new(Behaviour::Dishonest).unwrap().after_running("m@1", ran.clone()), ran);
    }
}
