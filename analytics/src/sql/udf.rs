//! `uuid_text(x)`: the archive's binary UUIDs (`FixedSizeBinary(16)`, and lists of them) as the
//! contract's lower-case hyphenated text, so the `attempts` view reads like the other tables.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, StringBuilder};
use arrow::datatypes::DataType;
use datafusion::common::{Result, exec_err};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility};

/// See the module docs. Lists become one comma-separated string.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct UuidText {
    signature: Signature,
}

impl Default for UuidText {
    fn default() -> Self {
        Self { signature: Signature::any(1, Volatility::Immutable) }
    }
}

fn append_uuid(out: &mut StringBuilder, bytes: &[u8]) {
    let mut buf = [0u8; 36];
    match uuid::Uuid::from_slice(bytes) {
        Ok(u) => out.append_value(u.hyphenated().encode_lower(&mut buf)),
        Err(_) => out.append_null(),
    }
}

fn convert(array: &ArrayRef) -> Result<ArrayRef> {
    let mut out = StringBuilder::with_capacity(array.len(), array.len() * 36);
    match array.data_type() {
        DataType::FixedSizeBinary(16) => {
            let a = array.as_fixed_size_binary();
            for i in 0..a.len() {
                if a.is_null(i) { out.append_null() } else { append_uuid(&mut out, a.value(i)) }
            }
        }
        DataType::List(item) if item.data_type() == &DataType::FixedSizeBinary(16) => {
            let lists = array.as_list::<i32>();
            let mut buf = [0u8; 36];
            let mut text = String::new();
            for i in 0..lists.len() {
                if lists.is_null(i) {
                    out.append_null();
                    continue;
                }
                let values = lists.value(i);
                let values = values.as_fixed_size_binary();
                text.clear();
                for j in 0..values.len() {
                    if j > 0 {
                        text.push(',');
                    }
                    if let Ok(u) = uuid::Uuid::from_slice(values.value(j)) {
                        text.push_str(u.hyphenated().encode_lower(&mut buf));
                    }
                }
                out.append_value(&text);
            }
        }
        other => return exec_err!("uuid_text expects FixedSizeBinary(16) or a list of it, found {other}"),
    }
    Ok(Arc::new(out.finish()))
}

impl ScalarUDFImpl for UuidText {
    fn name(&self) -> &str {
        "uuid_text"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [arg] = args.args.as_slice() else { return exec_err!("uuid_text takes one argument") };
        let array = arg.to_array(args.number_rows)?;
        Ok(ColumnarValue::Array(convert(&array)?))
    }
}
