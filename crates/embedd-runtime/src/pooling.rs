//! Sentence pooling over token vectors, as sentence-transformers' `Pooling` module does it.

use candle_core::{DType, Tensor, D};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Average of the non-padding token vectors.
    Mean,
    /// The first token's vector ([CLS]).
    Cls,
    /// Element-wise maximum over the non-padding tokens.
    Max,
    /// The last non-padding token's vector.
    #[serde(rename = "lasttoken")]
    LastToken,
}

impl std::str::FromStr for Pooling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mean" => Ok(Self::Mean),
            "cls" => Ok(Self::Cls),
            "max" => Ok(Self::Max),
            "lasttoken" | "last_token" => Ok(Self::LastToken),
            _ => Err(format!(
                "unknown pooling '{s}': expected mean, cls, max or lasttoken"
            )),
        }
    }
}

impl Pooling {
    /// Pools `hidden` `[batch, seq, dim]` under `mask` `[batch, seq]` (1 for real tokens, f32) to `[batch, dim]`.
    pub fn pool(self, hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = hidden.to_dtype(DType::F32)?;
        match self {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
            Pooling::Mean => {
                let m = mask.unsqueeze(D::Minus1)?;
                let summed = hidden.broadcast_mul(&m)?.sum(1)?;
                // clamp as sentence-transformers does, so an all-padding row cannot divide by zero
                let counts = m.sum(1)?.clamp(1e-9f32, f32::MAX)?;
                summed.broadcast_div(&counts)
            }
            Pooling::Max => {
                let m = mask.unsqueeze(D::Minus1)?;
                // padded positions get a very negative value so they never win the max
                let penalty = ((m.ones_like()? - &m)? * -1e9f64)?;
                hidden.broadcast_add(&penalty)?.max(1)
            }
            Pooling::LastToken => {
                let lengths: Vec<f32> = mask.sum(1)?.to_vec1()?;
                let rows = lengths
                    .iter()
                    .enumerate()
                    .map(|(i, &len)| {
                        let last = (len as usize).saturating_sub(1);
                        hidden.get(i)?.get(last)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::stack(&rows, 0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn fixture() -> (Tensor, Tensor) {
        // batch 2, seq 3, dim 2; second row has one padding position
        let hidden = Tensor::new(
            &[
                [[1f32, 2.], [3., 4.], [5., -6.]],
                [[-1., 0.], [7., 8.], [100., 100.]],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let mask = Tensor::new(&[[1f32, 1., 1.], [1., 1., 0.]], &Device::Cpu).unwrap();
        (hidden, mask)
    }

    #[test]
    fn each_mode_ignores_padding() {
        let (h, m) = fixture();
        let get = |p: Pooling| p.pool(&h, &m).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(get(Pooling::Mean), vec![vec![3., 0.], vec![3., 4.]]);
        assert_eq!(get(Pooling::Cls), vec![vec![1., 2.], vec![-1., 0.]]);
        assert_eq!(get(Pooling::Max), vec![vec![5., 4.], vec![7., 8.]]);
        assert_eq!(get(Pooling::LastToken), vec![vec![5., -6.], vec![7., 8.]]);
    }
}
