//! Mesh certificate authorities and workload certificates.
