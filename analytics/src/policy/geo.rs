//! Locations and great-circle distances, as the contract reads them: a sphere of radius
//! 6,371,008.8 m (the IUGG mean Earth radius), haversine formula.

use meshguard_schemas::registry::{Area, Country};
use serde::{Deserialize, Serialize};

/// Mean Earth radius of the contract, in metres.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// A location as a message attempt carries it: any part may be unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Location {
    /// Latitude, degrees.
    pub lat: Option<f64>,
    /// Longitude, degrees.
    pub lon: Option<f64>,
    /// ISO 3166 alpha-2 country (a value that is not two letters counts as unknown).
    pub country: Option<Country>,
}

impl Location {
    /// Whether nothing is known.
    pub fn is_unknown(&self) -> bool {
        self.country.is_none() && (self.lat.is_none() || self.lon.is_none())
    }

    /// JSON for findings' `detail`.
    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({ "lat": self.lat, "lon": self.lon, "country": self.country })
    }
}

/// Great-circle distance between two points in degrees, in metres.
pub fn distance_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

/// Whether `area` contains `loc`: `None` when the part of the location the area needs is unknown.
pub fn contains(area: &Area, loc: &Location) -> Option<bool> {
    match area {
        Area::Country { country } => loc.country.map(|c| c == *country),
        Area::Circle { lat, lon, radius_m } => match (loc.lat, loc.lon) {
            (Some(la), Some(lo)) => Some(distance_m(*lat, *lon, la, lo) <= *radius_m),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance
    }

    #[test]
    fn great_circle_distances() {
        // Berlin Brandenburg Gate to Paris Notre-Dame: about 878 km.
        assert!(close(distance_m(52.5163, 13.3777, 48.8530, 2.3499), 878_000.0, 3_000.0));
        // A quarter of the equator, and pole to pole: exact on the contract's sphere.
        let quarter = std::f64::consts::PI * EARTH_RADIUS_M / 2.0;
        assert!(close(distance_m(0.0, 0.0, 0.0, 90.0), quarter, 1e-6));
        assert!(close(distance_m(90.0, 0.0, -90.0, 0.0), 2.0 * quarter, 1e-6));
        // Antipodes (the haversine argument rounds above 1 here without the clamp).
        assert!(close(distance_m(0.0, 0.0, 0.0, 180.0), 2.0 * quarter, 1e-6));
        // Across the antimeridian: 179.5 E to 179.5 W is one degree of longitude.
        assert!(close(distance_m(0.0, 179.5, 0.0, -179.5), quarter / 90.0, 1e-6));
        assert_eq!(distance_m(10.0, 20.0, 10.0, 20.0), 0.0);
        // One degree of latitude is 111.195 km on this sphere.
        assert!(close(distance_m(0.0, 0.0, 1.0, 0.0), 111_195.08, 0.01));
    }

    #[test]
    fn areas() {
        let de = Country::parse("DE").expect("code");
        let at_gate = Location { lat: Some(52.5163), lon: Some(13.3777), country: Some(de) };
        let circle = Area::Circle { lat: 52.5200, lon: 13.4050, radius_m: 2_000.0 };
        assert_eq!(contains(&circle, &at_gate), Some(true));
        assert_eq!(contains(&Area::Circle { lat: 52.5200, lon: 13.4050, radius_m: 1_000.0 }, &at_gate), Some(false));
        assert_eq!(contains(&Area::Country { country: de }, &at_gate), Some(true));
        assert_eq!(contains(&Area::Country { country: Country::parse("fr").expect("code") }, &at_gate), Some(false));
        let country_only = Location { country: Some(de), ..Default::default() };
        assert_eq!(contains(&circle, &country_only), None, "no coordinates: unknown");
        assert_eq!(contains(&Area::Country { country: de }, &Location::default()), None);
        // The edge belongs to the circle.
        let edge = distance_m(0.0, 0.0, 0.0, 1.0);
        assert_eq!(
            contains(&Area::Circle { lat: 0.0, lon: 0.0, radius_m: edge }, &Location { lat: Some(0.0), lon: Some(1.0), country: None }),
            Some(true)
        );
    }
}
