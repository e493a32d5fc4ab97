/*
 * Import the results of a nuclass-qupath batch run into the current image.
 *
 * What it does: `nuclass-qupath project <project> --output-dir DIR` classifies every image of a
 * project from a shell and writes one GeoJSON file per image, named
 * "<image name>.nuclass.geojson". This script reads the file of the current image and applies
 * the classes and measurements to the cells and detections with the same object ids.
 * Use "Run for project" to import the results of every image.
 *
 * Parameters (set them below):
 *   resultsDir     folder with the results files; empty means the folder "nuclass_results"
 *                  beside project.qpproj (the default output folder of the batch run)
 *
 * Output, on each object that has a result:
 *   - the predicted class, registered with the model's colour unless the project already has it
 *   - measurements "NuClass: confidence", "NuClass: gate" and "NuClass: p(<class>)"; every earlier
 *     measurement starting with "NuClass: " is removed first, all other measurements stay
 * When the results file holds heatmap tiles, they replace the "NuClass heatmap" tiles of an
 * earlier run. In a project, the image metadata records "NuClass model" and "NuClass version".
 * An image without a results file is skipped with a warning.
 *
 * QuPath versions: 0.5 and 0.6. Works from the script editor and with "Run for project",
 * since it opens no dialog.
 */

import com.google.gson.JsonArray
import com.google.gson.JsonElement
import com.google.gson.JsonObject
import com.google.gson.JsonParser
import groovy.transform.Field
import java.nio.charset.StandardCharsets
import java.nio.file.Files
import javafx.application.Platform
import org.slf4j.LoggerFactory
import qupath.lib.common.ColorTools
import qupath.lib.gui.scripting.QPEx
import qupath.lib.images.ImageData
import qupath.lib.io.GsonTools
import qupath.lib.objects.PathObject
import qupath.lib.objects.PathTileObject
import qupath.lib.objects.classes.PathClass

// Parameters
String resultsDir = ""

// Get the image and its name in the project
ImageData imageData = getCurrentImageData()
if (imageData == null)
    throw new IllegalStateException("No image is open: open an image, or use Run for project")
def project = getProject()
def entry = getProjectEntry()
String imageName = entry != null ? entry.getImageName() : imageData.getServer().getMetadata().getName()

// Find the results file of this image
File folder
if (!resultsDir.trim().isEmpty()) {
    folder = new File(resultsDir.trim())
} else if (project != null) {
    folder = new File(buildFilePath(PROJECT_BASE_DIR, RESULTS_DIR_NAME))
} else {
    throw new IllegalArgumentException("No project is open: set resultsDir at the top of the script to the folder with the results files")
}
if (!folder.isDirectory())
    throw new IllegalArgumentException("Results folder " + folder + " not found: run 'nuclass-qupath project' first, or set resultsDir")
File resultsFile = new File(folder, resultsFileName(imageName))
if (!resultsFile.isFile()) {
    logger.warn("No results for image '{}': {} not found, image skipped", imageName, resultsFile)
    return
}

// Read the results
JsonObject root = readJson(resultsFile, true)

// Apply them to the cells and detections by id, replacing earlier tiles if the file has tiles
boolean hasTiles = root.getAsJsonArray("features").any { jsonString(jsonObject(it.getAsJsonObject(), "properties") ?: new JsonObject(), "objectType") == "tile" }
def objects = imageData.getHierarchy().getDetectionObjects().findAll { !(it instanceof PathTileObject) }
Map counts = applyNuclassResults(imageData, objects, root, hasTiles)
if (counts.classified == 0 && counts.withoutObject > 0)
    throw new IllegalStateException("None of the " + counts.withoutObject + " results in " + resultsFile + " match an object of image '" + imageName + "': were the cells detected again after the batch run?")
if (counts.withoutObject > 0)
    logger.warn("{} results match no object of image '{}' and were ignored", counts.withoutObject, imageName)
logger.info("Imported results for {} objects of '{}'; heatmap tiles: {} removed, {} added", counts.classified, imageName, counts.tilesRemoved, counts.tilesAdded)

// Record the model in the image metadata and save the project changes
recordRunInfo(runMetadataFile(resultsFile))
if (project != null) {
    try {
        project.syncChanges()
    } catch (IOException e) {
        logger.warn("Saving the project failed: {}", e.getMessage())
    }
}


// BEGIN shared rules (keep identical in classify_current_image.groovy and import_batch_results.groovy;
// nuclass_qupath/qupath/results.py applies the same rules in Python)

@Field final String MEASUREMENT_PREFIX = "NuClass: "
@Field final String TILE_NAME = "NuClass heatmap"
@Field final String TILE_CELLS_MEASUREMENT = "NuClass: cells"
@Field final String METADATA_MODEL_KEY = "NuClass model"
@Field final String METADATA_VERSION_KEY = "NuClass version"
@Field final String RESULTS_DIR_NAME = "nuclass_results"
@Field final String RESULTS_SUFFIX = ".nuclass.geojson"
@Field final def logger = LoggerFactory.getLogger("nuclass")

/**
 * Apply result features to objects by id: set the class, replace "NuClass: " measurements,
 * and, when replaceTiles is true, replace earlier heatmap tiles by the tiles of the results.
 * Returns the counts classified, withoutObject, tilesRemoved and tilesAdded.
 */
Map applyNuclassResults(ImageData imageData, Collection<PathObject> candidates, JsonObject root, boolean replaceTiles) {
    def hierarchy = imageData.getHierarchy()

    // Index the objects by id
    Map<String, PathObject> byId = [:]
    for (PathObject pathObject : candidates)
        byId.put(pathObject.getId().toString(), pathObject)

    // Set classes and measurements of the matched objects
    Map<String, PathClass> classes = [:]
    List<PathClass> added = []
    List<JsonObject> tiles = []
    int classified = 0
    int withoutObject = 0
    for (JsonElement element : root.getAsJsonArray("features")) {
        JsonObject feature = element.getAsJsonObject()
        JsonObject properties = jsonObject(feature, "properties") ?: new JsonObject()
        if (jsonString(properties, "objectType") == "tile") {
            tiles.add(feature)
            continue
        }
        String id = jsonString(feature, "id")
        if (id == null)
            continue
        PathObject pathObject = byId.get(id)
        if (pathObject == null) {
            withoutObject++
            continue
        }
        mergeMeasurements(pathObject, jsonObject(properties, "measurements") ?: new JsonObject())
        JsonObject classification = jsonObject(properties, "classification")
        if (classification != null)
            pathObject.setPathClass(resolvePathClass(classification, classes, added))
        classified++
    }

    // Replace earlier heatmap tiles, never adding a second set
    int tilesRemoved = 0
    int tilesAdded = 0
    if (replaceTiles) {
        def oldTiles = hierarchy.getTileObjects().findAll { isNuclassTile(it) }
        hierarchy.removeObjects(oldTiles, true)
        tilesRemoved = oldTiles.size()
        def gson = GsonTools.getInstance()
        def newTiles = tiles.collect { gson.fromJson(it, PathObject) }
        hierarchy.addObjects(newTiles)
        tilesAdded = newTiles.size()
    }

    // Register new classes and update the views
    registerPathClasses(added)
    fireHierarchyUpdate(hierarchy)
    return [classified: classified, withoutObject: withoutObject, tilesRemoved: tilesRemoved, tilesAdded: tilesAdded]
}

/** Return whether an object is a heatmap tile written by nuclass-qupath. */
boolean isNuclassTile(PathObject pathObject) {
    if (!(pathObject instanceof PathTileObject))
        return false
    return TILE_NAME == pathObject.getName() || pathObject.getMeasurementList().containsKey(TILE_CELLS_MEASUREMENT)
}

/** Remove every "NuClass: " measurement of an object, then put the new ones; other measurements stay. */
void mergeMeasurements(PathObject pathObject, JsonObject measurements) {
    def list = pathObject.getMeasurementList()
    def names = new ArrayList<String>(list.asMap().keySet())
    for (String name : names) {
        if (name.startsWith(MEASUREMENT_PREFIX))
            list.remove(name)
    }
    for (def entry : measurements.entrySet()) {
        String name = entry.getKey()
        if (!name.startsWith(MEASUREMENT_PREFIX))
            throw new IllegalStateException("Result measurement '" + name + "' does not start with '" + MEASUREMENT_PREFIX + "'")
        JsonElement value = entry.getValue()
        list.put(name, value.isJsonNull() ? Double.NaN : value.getAsDouble())
    }
}

/** Return the class of a GeoJSON classification; a class the project already has keeps its colour. */
PathClass resolvePathClass(JsonObject classification, Map<String, PathClass> cache, List<PathClass> added) {
    String name = classificationName(classification)
    if (cache.containsKey(name))
        return cache.get(name)
    Integer rgb = null
    JsonArray color = classification.has("color") ? classification.getAsJsonArray("color") : null
    if (color != null && color.size() >= 3)
        rgb = ColorTools.packRGB(color.get(0).getAsInt(), color.get(1).getAsInt(), color.get(2).getAsInt())
    def project = getProject()
    PathClass pathClass = project == null ? null : project.getPathClasses().find { it.toString() == name }
    if (pathClass != null) {
        if (rgb != null && pathClass.getColor() != null && (pathClass.getColor() & 0xFFFFFF) != (rgb & 0xFFFFFF))
            logger.warn("Class '{}' keeps the project's colour, which differs from the model's", name)
    } else {
        pathClass = PathClass.fromString(name)
        if (rgb != null)
            pathClass.setColor(rgb)
        added.add(pathClass)
    }
    cache.put(name, pathClass)
    return pathClass
}

/** Return the class name as QuPath shows it, joining the names of a derived class with ": ". */
String classificationName(JsonObject classification) {
    if (classification.has("names"))
        return classification.getAsJsonArray("names").collect { it.getAsString() }.join(": ")
    return classification.get("name").getAsString()
}

/** Add new classes to the project, and to the class list of the QuPath window if there is one. */
void registerPathClasses(List<PathClass> added) {
    if (added.isEmpty())
        return
    def project = getProject()
    if (project != null) {
        def all = new ArrayList<PathClass>(project.getPathClasses())
        all.addAll(added.findAll { !all.contains(it) })
        project.setPathClasses(all)
    }
    def gui = QPEx.getQuPath()
    if (gui != null) {
        // The class list of the window belongs to the JavaFX thread
        Platform.runLater {
            def available = gui.getAvailablePathClasses()
            available.addAll(added.findAll { !available.contains(it) })
        }
    }
}

/** Copy the model id and nuclass-qupath version of a run metadata file into the image metadata. */
void recordRunInfo(File runFile) {
    def entry = getProjectEntry()
    if (entry == null)
        return
    if (!runFile.isFile()) {
        logger.info("No run metadata at {}; the image metadata does not record the model", runFile)
        return
    }
    JsonObject info = readJson(runFile, false)
    JsonObject model = jsonObject(info, "model")
    String modelId = model == null ? null : jsonString(model, "model_id")
    if (modelId != null)
        entry.putMetadataValue(METADATA_MODEL_KEY, modelId)
    if (jsonString(info, "version") != null)
        entry.putMetadataValue(METADATA_VERSION_KEY, jsonString(info, "version"))
}

/** Return the run metadata file written beside a results file (X.nuclass.geojson -> X.nuclass.run.json). */
File runMetadataFile(File resultsFile) {
    String name = resultsFile.getName()
    for (String suffix : [".geojson.gz", ".json.gz", ".geojson", ".json", ".gz"]) {
        if (name.endsWith(suffix)) {
            name = name.substring(0, name.length() - suffix.length())
            break
        }
    }
    return new File(resultsFile.getParentFile(), name + ".run.json")
}

/** Parse a JSON file; with featureCollection, check that it is a GeoJSON FeatureCollection. */
JsonObject readJson(File file, boolean featureCollection) {
    def reader = Files.newBufferedReader(file.toPath(), StandardCharsets.UTF_8)
    try {
        JsonElement root = JsonParser.parseReader(reader)
        if (!root.isJsonObject() || (featureCollection && !root.getAsJsonObject().has("features")))
            throw new IllegalStateException(file.toString() + (featureCollection ? " is not a GeoJSON FeatureCollection" : " does not hold a JSON object"))
        return root.getAsJsonObject()
    } finally {
        reader.close()
    }
}

/** Return the batch-results file name of an image, with path separators replaced. */
String resultsFileName(String imageName) {
    String safe = imageName.replaceAll('[/\\\\:]', '_').trim()
    return (safe.isEmpty() ? "image" : safe) + RESULTS_SUFFIX
}

JsonObject jsonObject(JsonObject parent, String key) {
    return parent.has(key) && parent.get(key).isJsonObject() ? parent.getAsJsonObject(key) : null
}

String jsonString(JsonObject parent, String key) {
    return parent.has(key) && parent.get(key).isJsonPrimitive() ? parent.get(key).getAsString() : null
}

// END shared rules
