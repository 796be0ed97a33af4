//! The file formats `proxyctl` reads: documents of pools and routes (YAML, TOML, JSON) and
//! route tables as CSV. A library of their own, so the fuzz targets reach the parsers.

pub mod csv_routes;
pub mod document;
