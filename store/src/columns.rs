//! Reading the columns of a row on either backend, with an error that
//! names `table.column` when a value does not decode.

use sqlx::Row;

use crate::error::StoreError;

/// The columns of one row of `table`, for the decoders of every table.
pub(crate) struct Columns<'r, R> {
    row: &'r R,
    table: &'static str,
}

impl<'r, R> Columns<'r, R>
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    /// The columns of `row`, read from `table`.
    pub(crate) fn new(row: &'r R, table: &'static str) -> Self {
        Columns { row, table }
    }

    /// The value of column `name`; `Corrupt` naming `table.name` if it
    /// does not decode as `T`.
    pub(crate) fn get<T>(&self, name: &str) -> Result<T, StoreError>
    where
        for<'a> T: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    {
        self.row
            .try_get(name)
            .map_err(StoreError::corrupt(format!("{}.{name}", self.table)))
    }
}
