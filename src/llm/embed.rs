//! The token embedding table, kept quantized on the CPU.
//!
//! These models' vocabularies hold 152k tokens: in f32 their table takes
//! 0.54 GB (0.5B) and 0.93 GB (1.5B), as much as all their other weights
//! together, for a pass that reads a few of its rows. So on the CPU the
//! table stays as the GGUF file stores it and a pass dequantizes the rows
//! of its own tokens, with the same function (GGML's `to_float`) as the
//! whole-table dequantization, so the same numbers. Elsewhere (a GPU) the
//! table is dequantized once and rows are gathered on the device.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};

pub enum Embedding {
    /// Quantized rows on the host: `dtype` blocks, `row_bytes` per token.
    Rows { q: QTensor, dtype: GgmlDType, hidden: usize, row_bytes: usize },
    /// The dequantized table on its device.
    Table(Tensor),
}

impl Embedding {
    /// `q`: (vocabulary, hidden). `rows` keeps it quantized when this is the
    /// CPU and its block type has a row decoder here.
    pub fn new(q: QTensor, rows: bool) -> Result<Self> {
        let (vocab, hidden) = q.shape().dims2()?;
        let dtype = q.dtype();
        let decodable = matches!(dtype, GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K);
        if rows && decodable && q.device().is_cpu() && hidden.is_multiple_of(dtype.block_size()) {
            let row_bytes = hidden / dtype.block_size() * dtype.type_size();
            if q.data()?.len() == vocab * row_bytes {
                return Ok(Self::Rows { q, dtype, hidden, row_bytes });
            }
        }
        Ok(Self::Table(q.dequantize(&q.device())?))
    }

    /// The rows of `ids`: (ids, hidden) f32.
    pub fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        let (q, dtype, hidden, row_bytes) = match self {
            Self::Table(t) => return t.index_select(&Tensor::new(ids, device)?, 0),
            Self::Rows { q, dtype, hidden, row_bytes } => (q, *dtype, *hidden, *row_bytes),
        };
        let bytes = q.data()?;
        let vocab = bytes.len() / row_bytes;
        let mut out = vec![0f32; ids.len() * hidden];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
            if id as usize >= vocab {
                candle_core::bail!("token id {id} is outside the vocabulary of {vocab}");
            }
            let row = &bytes[id as usize * row_bytes..][..row_bytes];
            match dtype {
                GgmlDType::Q8_0 => decode::<BlockQ8_0>(row, o),
                GgmlDType::Q4_0 => decode::<BlockQ4_0>(row, o),
                GgmlDType::Q4K => decode::<BlockQ4K>(row, o),
                GgmlDType::Q5K => decode::<BlockQ5K>(row, o),
                GgmlDType::Q6K => decode::<BlockQ6K>(row, o),
                _ => unreachable!("Embedding::new keeps rows of decodable types only"),
            }?;
        }
        Tensor::from_vec(out, (ids.len(), hidden), device)
    }
}

/// One row of GGML blocks to f32.
fn decode<T: GgmlType>(row: &[u8], out: &mut [f32]) -> Result<()> {
    let size = std::mem::size_of::<T>();
    if !(row.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) || row.len() / size * T::BLCK_SIZE != out.len() {
        candle_core::bail!("embedding row of {} bytes does not hold {} values", row.len(), out.len());
    }
    // SAFETY: GGML blocks are #[repr(C)] structs of f16 scales and integer
    // arrays, valid for any bit pattern; length and alignment checked above.
    let blocks = unsafe { std::slice::from_raw_parts(row.as_ptr() as *const T, row.len() / size) };
    T::to_float(blocks, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_rows_equal_the_dequantized_table() {
        let (vocab, hidden) = (37, 512);
        let x = Tensor::randn(0f32, 1.0, (vocab, hidden), &Device::Cpu).unwrap();
        let ids = [0u32, 36, 5, 5, 17];
        for dt in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            let table = Embedding::new(QTensor::quantize(&x, dt).unwrap(), false).unwrap();
            let rows = Embedding::new(QTensor::quantize(&x, dt).unwrap(), true).unwrap();
            assert!(matches!(rows, Embedding::Rows { .. }), "{dt:?} stays quantized");
            let a: Vec<f32> = table.lookup(&ids, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = rows.lookup(&ids, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "{dt:?}");
            assert!(rows.lookup(&[vocab as u32], &Device::Cpu).unwrap_err().to_string().contains("outside the vocabulary"));
        }
    }

    #[test]
    fn other_types_keep_the_table() {
        let x = Tensor::randn(0f32, 1.0, (8, 64), &Device::Cpu).unwrap();
        let e = Embedding::new(QTensor::quantize(&x, GgmlDType::F16).unwrap(), true).unwrap();
        assert!(matches!(e, Embedding::Table(_)));
        let got: Vec<f32> = e.lookup(&[3], &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = x.get(3).unwrap().to_vec1().unwrap();
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-2));
    }
}
