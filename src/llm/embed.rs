//! The token embedding table, kept quantized on the CPU.
//!
//! These models' vocabularies hold 152k tokens: in f32 their table takes
//! 0.54 GB (0.5B) and 0.93 GB (1.5B), as much as all their other weights
//! together, for a pass that reads a few of its rows. So on the CPU the
//! table stays as the GGUF file stores it (shared with a tied output layer)
//! and a pass dequantizes the rows of its own tokens, with the function
//! that dequantizes whole tensors, so the same numbers. Elsewhere (a GPU),
//! or for a block type without a decoder here, the table is dequantized once
//! and rows are gathered on the device.

use super::transformer::dequantize_into;
use candle_core::quantized::QTensor;
use candle_core::{Device, Result, Tensor};
use std::sync::Arc;

pub enum Embedding {
    /// The quantized table on the host, (vocabulary, hidden).
    Rows(Arc<QTensor>),
    /// The dequantized table on its device.
    Table(Tensor),
}

impl Embedding {
    /// `q`: (vocabulary, hidden). `rows`: keep it quantized if it is on the
    /// CPU and its rows decode here.
    pub fn new(q: Arc<QTensor>, rows: bool) -> Result<Self> {
        q.shape().dims2()?;
        if rows && q.device().is_cpu() {
            let e = Self::Rows(q.clone());
            // The first row decodes: the type has a decoder here and a row
            // is whole blocks.
            if e.lookup(&[0], &Device::Cpu).is_ok() {
                return Ok(e);
            }
        }
        Ok(Self::Table(q.dequantize(&q.device())?))
    }

    /// The rows of `ids`: (ids, hidden) f32.
    pub fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        let q = match self {
            Self::Table(t) => return t.index_select(&Tensor::new(ids, device)?, 0),
            Self::Rows(q) => q,
        };
        let (vocab, hidden) = q.shape().dims2()?;
        let row_bytes = hidden / q.dtype().block_size() * q.dtype().type_size();
        let bytes = q.data()?;
        let mut out = vec![0f32; ids.len() * hidden];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
            if id as usize >= vocab {
                candle_core::bail!("token id {id} is outside the vocabulary of {vocab}");
            }
            if !dequantize_into(q.dtype(), &bytes[id as usize * row_bytes..][..row_bytes], o) {
                candle_core::bail!("embedding rows of {:?} do not decode here", q.dtype());
            }
        }
        Tensor::from_vec(out, (ids.len(), hidden), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    fn table(x: &Tensor, dt: GgmlDType, rows: bool) -> Embedding {
        Embedding::new(Arc::new(QTensor::quantize(x, dt).unwrap()), rows).unwrap()
    }

    fn values(t: Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn quantized_rows_equal_the_dequantized_table() {
        let (vocab, hidden) = (37, 512);
        let x = Tensor::randn(0f32, 1.0, (vocab, hidden), &Device::Cpu).unwrap();
        let ids = [0u32, 36, 5, 5, 17];
        for dt in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            let (whole, rows) = (table(&x, dt, false), table(&x, dt, true));
            assert!(matches!(rows, Embedding::Rows(_)), "{dt:?} stays quantized");
            let a = values(whole.lookup(&ids, &Device::Cpu).unwrap());
            let b = values(rows.lookup(&ids, &Device::Cpu).unwrap());
            assert_eq!(a, b, "{dt:?}");
            assert!(rows.lookup(&[vocab as u32], &Device::Cpu).unwrap_err().to_string().contains("outside the vocabulary"));
        }
    }

    #[test]
    fn other_types_keep_the_table() {
        let x = Tensor::randn(0f32, 1.0, (8, 64), &Device::Cpu).unwrap();
        let e = table(&x, GgmlDType::F16, true);
        assert!(matches!(e, Embedding::Table(_)));
        let got = values(e.lookup(&[3], &Device::Cpu).unwrap());
        let want: Vec<f32> = x.get(3).unwrap().to_vec1().unwrap();
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-2));
    }
}
