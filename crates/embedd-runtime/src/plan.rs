//! How a model runs, chosen once at load from `--device` and `--dtype`: which device, the number
//! format its weights are stored in, and which executor runs its layers. Nothing downstream
//! looks at a tensor to decide how to compute; it reads the plan it was built with.

use std::fmt;

use candle_core::{DType, Device};

use crate::device::{DeviceSpec, Precision};
use crate::error::{Result, RuntimeError};
use crate::kernels;

/// The number format of the fused CPU kernels' products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedProducts {
    /// float32 throughout: exact parity with float32 references.
    F32,
    /// Dense layers and attention products on bfloat16 inputs with float32 sums (AVX-512
    /// BF16); softmax and LayerNorm stay float32. Weights are packed to bfloat16 at load.
    Bf16,
    /// Dense layers on 8-bit weights and inputs with int32 sums (AVX-512 VNNI), scaled back to
    /// float32; attention, softmax and LayerNorm stay float32. Weights are quantized at load.
    Int8,
}

/// What runs a backbone's layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executor {
    /// embedd's fused CPU kernels over packed rows (padding removed).
    Fused(FusedProducts),
    /// candle's graph, one tensor operation per step: GPUs, the families without a fused
    /// path, and the reference the fused path is tested against.
    Graph,
}

#[derive(Debug, Clone)]
pub struct ExecutionPlan {
    pub device: Device,
    pub device_spec: DeviceSpec,
    /// What the weights are loaded as.
    pub storage: DType,
    pub executor: Executor,
}

impl ExecutionPlan {
    /// The plan for a command line's device and dtype: the fused kernels on the CPU, candle's
    /// graph on a GPU with the weights in the asked-for format.
    pub fn resolve(device: DeviceSpec, precision: Precision) -> Result<Self> {
        let refuse = |reason: &str| RuntimeError::Precision {
            precision: precision.to_string(),
            reason: reason.to_string(),
        };
        let (storage, executor) = match (device, precision) {
            (DeviceSpec::Cpu, Precision::F32) => (DType::F32, Executor::Fused(FusedProducts::F32)),
            (DeviceSpec::Cpu, Precision::Bf16) => {
                if !kernels::bf16::available() {
                    return Err(refuse(
                        "bf16 needs a CPU with AVX-512 BF16 (avx512_bf16); use f32",
                    ));
                }
                // Loaded as float32, packed to bfloat16 layer by layer.
                (DType::F32, Executor::Fused(FusedProducts::Bf16))
            }
            (DeviceSpec::Cpu, Precision::Int8) => {
                if !kernels::int8::available() {
                    return Err(refuse(
                        "int8 needs a CPU with AVX-512 VNNI (avx512_vnni); use f32",
                    ));
                }
                (DType::F32, Executor::Fused(FusedProducts::Int8))
            }
            (DeviceSpec::Cuda(_), Precision::Int8) => {
                return Err(refuse("int8 runs on the CPU; on CUDA use f16, bf16 or f32"))
            }
            (DeviceSpec::Cpu, Precision::F16) => {
                return Err(refuse(
                    "f16 runs on CUDA devices; on the CPU use f32 or bf16",
                ))
            }
            (DeviceSpec::Cuda(_), p) => (p.dtype(), Executor::Graph),
        };
        Ok(Self {
            device: device.open()?,
            device_spec: device,
            storage,
            executor,
        })
    }

    /// candle's graph on `device` with weights in `storage`.
    pub fn graph(device: Device, storage: DType) -> Self {
        let device_spec = match &device {
            Device::Cuda(_) => DeviceSpec::Cuda(0),
            _ => DeviceSpec::Cpu,
        };
        Self {
            device,
            device_spec,
            storage,
            executor: Executor::Graph,
        }
    }

    /// The plan a family without fused kernels runs under: the graph, in the same storage
    /// format; reduced precision on the CPU is refused, since the graph has no bf16 CPU path
    /// worth serving.
    pub fn without_fused_kernels(&self, family: &str) -> Result<Self> {
        match self.executor {
            Executor::Graph => Ok(self.clone()),
            Executor::Fused(FusedProducts::F32) => Ok(Self {
                executor: Executor::Graph,
                ..self.clone()
            }),
            Executor::Fused(reduced @ (FusedProducts::Bf16 | FusedProducts::Int8)) => {
                Err(RuntimeError::Precision {
                    precision: match reduced {
                        FusedProducts::Int8 => Precision::Int8,
                        _ => Precision::Bf16,
                    }
                    .to_string(),
                    reason: format!("{family} has no reduced-precision CPU path; use f32"),
                })
            }
        }
    }

    pub fn fused(&self) -> Option<FusedProducts> {
        match self.executor {
            Executor::Fused(p) => Some(p),
            Executor::Graph => None,
        }
    }
}

impl fmt::Display for ExecutionPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let executor = match self.executor {
            Executor::Fused(FusedProducts::F32) => "fused f32",
            Executor::Fused(FusedProducts::Bf16) => "fused bf16",
            Executor::Fused(FusedProducts::Int8) => "fused int8",
            Executor::Graph => "graph",
        };
        write!(
            f,
            "{} {executor}, {:?} weights",
            self.device_spec, self.storage
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_runs_fused_kernels_and_refuses_f16() {
        let plan = ExecutionPlan::resolve(DeviceSpec::Cpu, Precision::F32).unwrap();
        assert_eq!(plan.executor, Executor::Fused(FusedProducts::F32));
        assert_eq!(plan.storage, DType::F32);
        let graph = plan.without_fused_kernels("T5").unwrap();
        assert_eq!(graph.executor, Executor::Graph);
        let err = ExecutionPlan::resolve(DeviceSpec::Cpu, Precision::F16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("CUDA"), "{err}");
        match ExecutionPlan::resolve(DeviceSpec::Cpu, Precision::Bf16) {
            Ok(bf16) => {
                assert_eq!(bf16.executor, Executor::Fused(FusedProducts::Bf16));
                assert!(bf16.without_fused_kernels("T5").is_err());
            }
            Err(e) => assert!(!kernels::bf16::available(), "{e}"),
        }
        match ExecutionPlan::resolve(DeviceSpec::Cpu, Precision::Int8) {
            Ok(int8) => {
                assert_eq!(int8.executor, Executor::Fused(FusedProducts::Int8));
                assert!(int8.without_fused_kernels("T5").is_err());
            }
            Err(e) => assert!(!kernels::int8::available(), "{e}"),
        }
    }
}
